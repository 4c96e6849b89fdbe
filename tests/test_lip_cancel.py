"""Cancel: a request cancelled by id (or by its client giving up) stops within a step and
leaves its file whole."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from symphony.lipctl import connect
from symphony.lipctl.aio import connect as aconnect
from symphony.sched.protocol import FrameBuffer, encode
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread

ENDS = [256, 257, 258]  # the tiny model's control tokens: never stop early


@pytest.fixture
def small_steps(tmp_path):
    """A tiny-model server whose steps take at most 4 tokens: prompts take many steps."""
    thread = ServerThread(
        make_tiny_engine(num_pages=256, page_size=4), str(tmp_path / "s.sock"), max_step_tokens=4
    )
    thread.start()
    yield thread
    thread.stop()
    assert thread.error is None


class Raw:
    """Frames by hand, to send a cancel between a request and its answer."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(30)
        self.frames = FrameBuffer()
        self.pending: list[dict] = []

    def send(self, message: dict) -> None:
        self.sock.sendall(encode(message))

    def next(self) -> dict:
        while not self.pending:
            self.frames.feed(self.sock.recv(65536))
            self.pending += self.frames.frames()
        return self.pending.pop(0)

    def final(self, rid: int) -> dict:
        while True:
            frame = self.next()
            if frame.get("id") == rid and "stream" not in frame:
                return frame


def prompt(lip, path: str, n: int = 8) -> None:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True)
    lip.call("forward", path=path, tokens=[65 + i % 26 for i in range(n)])


def settled(server: ServerThread) -> int:
    """tokens_computed once it stops moving (two reads a few steps apart agree)."""
    before = -1
    while True:
        now = server.run_sync(lambda: server.server.scheduler.num_tokens)
        if now == before:
            return now
        before = now
        time.sleep(0.2)


def test_a_cancelled_generate_stops_within_a_step_and_answers(tiny_server) -> None:
    path = tiny_server.server.config.socket_path
    with connect(path) as lip:
        prompt(lip, "g.kv")
    raw = Raw(path)
    raw.send(
        {
            "id": 1,
            "call": "generate",
            "args": {
                "path": "g.kv",
                "max_tokens": 4000,
                "stream": True,
                "sampler": {"temperature": 0, "blocked": ENDS},
            },
        }
    )
    for _ in range(5):  # some pieces arrive: it is generating
        assert "stream" in raw.next()
    raw.send({"cancel": 1})
    reply = raw.final(1)
    assert reply["ok"], reply
    result = reply["result"]
    assert result["finish_reason"] == "cancelled"
    assert 5 <= len(result["token_ids"]) < 4000
    computed = settled(tiny_server)
    time.sleep(0.3)
    assert tiny_server.run_sync(lambda: tiny_server.server.scheduler.num_tokens) == computed
    with connect(path) as lip:
        stat = lip.call("kv_stat", path="g.kv")
        # every generated token but perhaps the last (sampled, its append cancelled)
        assert stat["tokens"] - 8 in (len(result["token_ids"]), len(result["token_ids"]) - 1)
        assert lip.call("kv_stat", path="g.kv")["tokens"] == stat["tokens"]
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_a_cancelled_prompt_keeps_the_whole_tokens_computed(small_steps) -> None:
    path = small_steps.server.config.socket_path
    with connect(path) as lip:
        lip.call("kv_open", path="p.kv", create=True)
    raw = Raw(path)
    long_prompt = [65 + i % 26 for i in range(800)]  # 200 steps of 4
    raw.send({"id": 7, "call": "forward", "args": {"path": "p.kv", "tokens": long_prompt}})
    time.sleep(0.1)
    raw.send({"cancel": 7})
    reply = raw.final(7)
    assert not reply["ok"] and reply["errno"] == "ECANCELED"
    with connect(path) as lip:
        kept = lip.call("kv_stat", path="p.kv")["tokens"]
        assert 0 < kept < 800 and kept % 4 == 0  # whole steps' tokens, no more
        # the file is a good context: appending the rest gives what one append gives
        rest = lip.call("forward", path="p.kv", tokens=long_prompt[kept:], outputs=[{"top_k": 3}])
        lip.call("kv_open", path="whole.kv", create=True)
        whole = lip.call("forward", path="whole.kv", tokens=long_prompt, outputs=[{"top_k": 3}])
        assert [t for t, _ in rest["outputs"][0]["top_k"]] == [
            t for t, _ in whole["outputs"][0]["top_k"]
        ]
    small_steps.run_sync(small_steps.server.store.check_invariants)


def test_closing_a_stream_cancels_and_the_connection_goes_on(tiny_server) -> None:
    path = tiny_server.server.config.socket_path
    with connect(path) as lip:
        prompt(lip, "s.kv")
        kv = lip.kv("s.kv")
        stream = kv.generate_stream(max_tokens=4000, temperature=0, blocked=ENDS)
        for _ in range(3):
            next(stream)
        stream.close()
        computed = settled(tiny_server)
        assert kv.stat()["tokens"] < 8 + 400
        assert lip.tokenize("still here") == list(b"still here")
        time.sleep(0.3)
        assert tiny_server.run_sync(lambda: tiny_server.server.scheduler.num_tokens) == computed


def test_a_pruned_branch_frees_its_seat_and_the_others_finish(tiny_server) -> None:
    """A tree of thought: three branches generate; one is pruned (its cancel scope
    cancelled after 40 tokens) and stops at once, the others run to their end. (Pruned
    after half a second instead, a faster step let it fill the pool's 128 pages of 4.)"""
    path = tiny_server.server.config.socket_path
    results: dict[int, object] = {}

    async def main() -> None:
        async with aconnect(path) as lip:
            root = await lip.kv("root.kv", create=True)
            await root.append([65, 66, 67, 68])
            branches = [await root.fork(f"b{i}.kv") for i in range(3)]

            async def grow(i: int) -> None:
                results[i] = await branches[i].generate(
                    max_tokens=60 if i else 4000, temperature=0, blocked=ENDS
                )

            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as pruned:  # the branch to prune
                    stream = branches[0].generate_stream(
                        max_tokens=4000, temperature=0, blocked=ENDS
                    )
                    async with stream:
                        seen = 0
                        async for piece in stream:
                            seen += len(piece.token_ids)
                            if seen >= 40:
                                pruned.cancel()
                    results[0] = stream.result  # never reached: pruned first
                assert pruned.cancelled_caught
                await trio.sleep(0.3)  # a step or two
                waiting = await lip.status()
                nursery.start_soon(grow, 1)
                nursery.start_soon(grow, 2)
            after = await lip.status()
            assert waiting["waiting"] == 0  # the pruned branch left the batch
            assert after["waiting"] == 0
            stat = await branches[0].stat()
            assert 4 + 40 <= stat["tokens"] < 4 + 4000

    trio.run(main)
    assert 0 not in results
    assert [results[i].finish_reason for i in (1, 2)] == ["length", "length"]
    tiny_server.run_sync(tiny_server.server.store.check_invariants)
