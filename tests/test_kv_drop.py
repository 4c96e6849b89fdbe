"""kv_drop: removing tokens from the middle of a context (issue 11, item 4, without
re-rotation): the same logits as a mask hiding them, pages given back, shared pages
copied first."""

from __future__ import annotations

import pytest

from symphony.lipctl import SymphonyError, connect
from tests.logit_rows import close, logits

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65]  # 14 tokens
NEW = [100, 33, 10]


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


def fresh(lip, path: str, tokens: list[int]) -> None:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True)
    lip.call("forward", path=path, tokens=tokens)


ASK = [{"at": [0, 1, 2], "logits": True}]


@pytest.mark.parametrize(("start", "end"), [(3, 7), (4, 12), (0, 5), (5, 6)])
def test_a_drop_gives_what_a_mask_hiding_the_range_gives(lip, tiny_server, start, end) -> None:
    n = len(PROMPT)
    fresh(lip, "dropped.kv", PROMPT)
    stat = lip.call("kv_drop", path="dropped.kv", start=start, end=end)
    assert stat["tokens"] == n - (end - start)
    dropped = lip.call("forward", path="dropped.kv", tokens=NEW, outputs=ASK)
    fresh(lip, "masked.kv", PROMPT)
    attention = [[*([0, start] if start else []), end, n + j + 1] for j in range(3)]
    masked = lip.call("forward", path="masked.kv", tokens=NEW, attention=attention, outputs=ASK)
    for at in range(3):
        assert close(logits(dropped, at), logits(masked, at))
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_a_drop_gives_pages_back_and_leaves_a_fork_as_it_was(lip, tiny_server) -> None:
    long = PROMPT * 4  # 56 tokens, 14 pages of 4
    fresh(lip, "a.kv", long)
    lip.call("kv_fork", src="a.kv", dst="b.kv")
    before = lip.call("forward", path="a.kv", tokens=NEW, keep=False, outputs=ASK)
    used = lip.call("status")["pages"]["used"]
    lip.call("kv_drop", path="b.kv", start=6, end=50)
    assert lip.call("kv_stat", path="b.kv")["pages"] == 3  # 12 tokens
    after = lip.call("forward", path="a.kv", tokens=NEW, keep=False, outputs=ASK)
    for at in range(3):  # the fork's shared pages were copied, never written
        assert logits(before, at) == logits(after, at)
    lip.call("kv_unlink", path="a.kv")
    assert lip.call("status")["pages"]["used"] < used
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_bad_drops_are_einval_and_change_nothing(lip) -> None:
    fresh(lip, "a.kv", PROMPT)
    for start, end in ((5, 3), (-1, 2), (3, 99)):
        with pytest.raises(SymphonyError) as info:
            lip.call("kv_drop", path="a.kv", start=start, end=end)
        assert info.value.errno == "EINVAL"
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT)
    lip.kv("a.kv").drop(10, len(PROMPT))  # a suffix: a truncate
    assert lip.call("kv_stat", path="a.kv")["tokens"] == 10


def test_a_masked_tail_keeps_its_mask_through_a_drop(lip) -> None:
    """The prediction after a masked last token, recomputed after a drop before it, is
    what it was (its ranges move with the tokens)."""
    n = len(PROMPT)
    fresh(lip, "a.kv", PROMPT)
    appended = lip.call(
        "forward",
        path="a.kv",
        tokens=[7],
        attention=[[0, 2, 8, n + 1]],
        outputs=[{"logits": True}],
    )
    lip.call("kv_drop", path="a.kv", start=3, end=6)  # inside what the token never saw
    again = lip.call(
        "forward", path="a.kv", tokens=[], keep=False, outputs=[{"at": -1, "logits": True}]
    )
    assert close(logits(appended, 0), logits(again, -1))
