"""kv_drop with reposition (issue 11, item 4): the tokens after the range close the gap,
their keys turned to the new positions by RoPE (StreamingLLM's attention sinks)."""

from __future__ import annotations

import pytest
import torch

from symphony.engine.page_pool import PagePool
from symphony.engine.rope import apply_rope, rope_tables, rotate_cached_keys
from symphony.fs.nodes import ROOT
from symphony.lipctl import SymphonyError, connect
from symphony.sched.control import parse_command
from tests.logit_rows import close, logits
from tests.tiny import tiny_config

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65]  # 14 tokens
NEW = [100, 33, 10]
ASK = [{"at": [0, 1, 2], "logits": True}]


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


def slots_of(pages: list[int], indices: range, page_size: int) -> torch.Tensor:
    return torch.tensor([pages[i // page_size] * page_size + i % page_size for i in indices])


def test_a_key_turned_by_minus_d_is_the_key_computed_at_p_minus_d() -> None:
    """R(-d)·R(p)·k = R(p - d)·k within 1e-5 in fp32, and the values stay as they were."""
    config = tiny_config()
    cos, sin = rope_tables(config, "cpu")
    pool = PagePool(2, 8, 4, config.num_kv_heads, config.head_dim, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    n = 20
    at = torch.randint(0, 40, (n,), generator=g)  # where each key was computed
    shifts = torch.randint(-40, 40, (n,), generator=g).clamp(min=-at)  # down (drop), up (concat)
    slots = list(range(3, 3 + n))
    raw = [torch.randn(n, config.num_kv_heads, config.head_dim, generator=g) for _ in range(2)]
    for layer, k in enumerate(raw):
        pool.k_cache[layer].view(-1, *k.shape[1:])[slots] = apply_rope(
            k, cos[at].unsqueeze(1), sin[at].unsqueeze(1)
        )
        pool.v_cache[layer].view(-1, *k.shape[1:])[slots] = k
    rotate_cached_keys(pool, slots, shifts.tolist(), cos, sin)
    moved = at + shifts
    for layer, k in enumerate(raw):
        want = apply_rope(k, cos[moved].unsqueeze(1), sin[moved].unsqueeze(1))
        got = pool.k_cache[layer].view(-1, *k.shape[1:])[slots]
        assert (got - want).abs().max().item() < 1e-5
        assert torch.equal(pool.v_cache[layer].view(-1, *k.shape[1:])[slots], k)


def test_a_repositioned_tail_that_never_saw_the_range_is_what_computing_it_there_gives(
    lip, tiny_server
) -> None:
    """A tail computed under a mask hiding everything before it depends only on its own
    relative positions: dropped with reposition, its K/V and the prediction after it are
    what computing it at its new place gives, its V byte for byte what it was, and the
    file it was forked from is unchanged."""
    start, end = 3, 9  # the tail: PROMPT[9:], 5 tokens
    tail = PROMPT[end:]
    lip.call("kv_open", path="f.kv", create=True)
    lip.call("forward", path="f.kv", tokens=PROMPT[:end])
    own = [[end, end + j + 1] for j in range(len(tail))]  # each tail token sees the tail
    lip.call("forward", path="f.kv", tokens=tail, attention=own)
    lip.kv("f.kv").fork("g.kv")
    lip.call("kv_open", path="h.kv", create=True)  # the same, computed at its new place
    lip.call("forward", path="h.kv", tokens=PROMPT[:start])
    there = [[start, start + j + 1] for j in range(len(tail))]
    lip.call("forward", path="h.kv", tokens=tail, attention=there)
    store, pool = tiny_server.server.store, tiny_server.server.engine.pool
    f = tiny_server.run_sync(store.ns.lookup_file, "f.kv", ROOT)
    source = [pool.page_bytes(p) for p in f.pages]

    lip.kv("g.kv").drop(start, end, reposition=True)

    stat = lip.kv("g.kv").stat()
    n = len(PROMPT) - (end - start)
    assert (stat["tokens"], stat["next_position"]) == (n, n)  # contiguous again
    g, h = (tiny_server.run_sync(store.ns.lookup_file, p, ROOT) for p in ("g.kv", "h.kv"))
    assert g.positions is None and g.custom_from == start  # never indexed
    assert tiny_server.run_sync(pool.max_abs_diff, g.pages, h.pages, n) < 1e-5
    ps = pool.page_size
    moved, was = slots_of(g.pages, range(start, n), ps), slots_of(f.pages, range(end, 14), ps)
    for v in pool.v_cache:
        assert torch.equal(v.flatten(0, 1)[moved], v.flatten(0, 1)[was])
    assert [pool.page_bytes(p) for p in f.pages] == source
    after_g = lip.call("forward", path="g.kv", tokens=NEW, keep=False, outputs=ASK)
    after_h = lip.call("forward", path="h.kv", tokens=NEW, keep=False, outputs=ASK)
    for at in range(3):
        assert close(logits(after_g, at), logits(after_h, at))
    tiny_server.run_sync(store.check_invariants)


def test_after_a_repositioned_drop_appends_follow_on_and_predict_finite_logits(lip) -> None:
    kv = lip.kv("a.kv", create=True)
    kv.append(PROMPT * 2)  # 28 tokens
    kv.drop(4, 20, reposition=True)
    assert kv.stat()["next_position"] == 12
    result = kv.forward(NEW, outputs=ASK)
    assert result.tokens == 15 and kv.stat()["next_position"] == 15
    for out in result.outputs:
        assert all(abs(x) < float("inf") for x in out.logit_values())
    again = kv.forward([], keep=False, outputs=[{"at": -1, "logits": True}])
    assert close(list(again.outputs[0].logit_values()), list(result.outputs[2].logit_values()))


def test_a_reposition_past_the_model_positions_is_einval_and_changes_nothing(lip) -> None:
    """Custom positions can make the tail move up (the range's first position above its
    last) or below 0; the model has neither, so the drop is refused whole."""
    lip.call("kv_open", path="a.kv", create=True)
    lip.call("forward", path="a.kv", tokens=[5, 6, 7, 8], positions=[30, 0, 2047, 1])
    for start, end in ((0, 1), (1, 2)):  # shifts +30 (to 2077) and -2047 (to -2046)
        with pytest.raises(SymphonyError) as info:
            lip.kv("a.kv").drop(start, end, reposition=True)
        assert info.value.errno == "EINVAL"
    assert lip.kv("a.kv").stat()["tokens"] == 4
    lip.kv("a.kv").drop(0, 1)  # without reposition the positions stay: fine
    assert lip.kv("a.kv").stat()["next_position"] == 2


def test_ctl_takes_reposition_as_a_word_after_the_range() -> None:
    line = "kv_drop demo/a.kv 4 60 reposition"
    assert parse_command(line) == (
        "kv_drop",
        {"path": "demo/a.kv", "start": 4, "end": 60, "reposition": True},
    )
    assert parse_command("kv_drop reposition 4 60")[1]["path"] == "reposition"  # a file's name
