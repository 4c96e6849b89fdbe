"""/.sys/ctl: reading command lines, and a session's pace (the mount tests run it for real)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT
from symphony.sched.control import MAX_QUEUED, ControlSession, Waiters, parse_command


@pytest.mark.parametrize(
    ("line", "call", "args"),
    [
        ("status", "status", {}),
        (
            "  kv_open a.kv create=true mode=384 ",
            "kv_open",
            {"path": "a.kv", "create": True, "mode": 384},
        ),
        ("kv_fork a.kv b.kv", "kv_fork", {"src": "a.kv", "dst": "b.kv"}),
        ("kv_truncate a.kv 3", "kv_truncate", {"path": "a.kv", "n": 3}),
        ("kv_stat 42", "kv_stat", {"path": "42"}),  # a bare path stays text
        ("forward a.kv [5, 6,7]", "forward", {"path": "a.kv", "tokens": [5, 6, 7]}),
        ('forward a.kv text="two words"', "forward", {"path": "a.kv", "text": "two words"}),
        ('tokenize "x=1 y"', "tokenize", {"text": "x=1 y"}),
        (
            'generate a.kv max_tokens=4 sampler={"temperature": 0, "top_k": 5} stop=["\\n"]',
            "generate",
            {
                "path": "a.kv",
                "max_tokens": 4,
                "sampler": {"temperature": 0, "top_k": 5},
                "stop": ["\n"],
            },
        ),
        ("kill 17", "kill", {"pid": 17}),
    ],
)
def test_lines_become_calls(line, call, args):
    assert parse_command(line) == (call, args)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "kv_fork a b c",
        "status extra",
        "forward a.kv [1, 2",
        "path=a.kv kv_stat",
        'x "open',
    ],
)
def test_malformed_lines_are_einval(line):
    with pytest.raises(StoreError) as info:
        parse_command(line)
    assert info.value.errno_name == "EINVAL"


class InstantSyscalls:
    """Answers every call at once, never yielding (as `status` does)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.num_calls = 0

    async def answer(self, call: object, name: str, args: dict[str, Any]) -> Any:
        self.num_calls += 1
        return {"n": self.num_calls}


async def _nothing() -> None:
    pass


async def test_a_flood_of_lines_waits_for_them_and_yields_between_them(nursery):
    syscalls = InstantSyscalls(nursery)
    session = ControlSession(
        syscalls,  # type: ignore[arg-type]
        ROOT,
        None,  # type: ignore[arg-type]
        False,  # write-only, as `cmd > /.sys/ctl`
        Waiters(4, 4),
        after_call=_nothing,
        on_close=lambda: None,
    )
    others = 0

    async def other_task() -> None:
        nonlocal others
        while True:
            others += 1
            await trio.sleep(0)

    nursery.start_soon(other_task)
    await session.send(b"status\n" * 1000)
    # the write returned once at most MAX_QUEUED of its lines were left to run
    assert syscalls.num_calls >= 1000 - MAX_QUEUED
    assert others >= syscalls.num_calls // 2  # the loop ran other tasks between lines
    session.close()
    with trio.fail_after(5):
        while syscalls.num_calls < 1000:
            await trio.sleep(0.01)
    assert syscalls.num_calls == 1000  # write-only: what was written runs to the end
    nursery.cancel_scope.cancel()


async def test_a_reading_opener_gets_every_reply(nursery):
    syscalls = InstantSyscalls(nursery)
    session = ControlSession(
        syscalls,  # type: ignore[arg-type]
        ROOT,
        None,  # type: ignore[arg-type]
        True,
        Waiters(4, 4),
        after_call=_nothing,
        on_close=lambda: None,
    )
    await session.send(b"status\n" * (MAX_QUEUED * 3))
    replies = b""
    while chunk := await session.receive(1 << 16):
        replies += chunk
    assert replies.count(b"\n") == MAX_QUEUED * 3
    assert replies.startswith(b'ok {"n":1}\n')
