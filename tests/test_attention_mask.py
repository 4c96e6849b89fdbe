"""Explicit positions, visible ranges and chosen logit rows, checked against references
computed without them."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from symphony.engine.attention import FlashAttention, SdpaAttention
from symphony.engine.batch import SeqChunk, build_step_input

PROMPT = list(range(20, 30))  # 10 tokens at slots 0..9
NEW = [40, 41, 42]  # then slots 10..12, rotary positions 10..12
HIDDEN = (3, 7)  # slots 3..6, hidden from every later token


def without_hidden(slot: int) -> list[int]:
    """Visible ranges of the token at `slot` (past the hidden span): all but 3..6."""
    return [0, HIDDEN[0], HIDDEN[1], slot + 1]


def masked_prompt(pages: list[int]) -> SeqChunk:
    """The whole prompt, its tokens past the hidden span not seeing it."""
    visible = [None if s < HIDDEN[1] else without_hidden(s) for s in range(len(PROMPT))]
    return SeqChunk(PROMPT, 0, pages, 0, visible=visible)


def reference_logits(engine) -> torch.Tensor:
    """NEW's logits [3, vocab] after a prompt that never had slots 3..6, the rest of it
    and NEW keeping the rotary positions they have in the full prompt."""
    kept = list(range(HIDDEN[0])) + list(range(HIDDEN[1], len(PROMPT)))
    pages = engine.pool.allocate(engine.pages_for(len(kept) + len(NEW)))
    engine.step([SeqChunk([PROMPT[p] for p in kept], 0, pages, 0, positions=kept)])
    positions = list(range(len(PROMPT), len(PROMPT) + len(NEW)))
    logits = engine.step([SeqChunk(NEW, len(kept), pages, len(NEW), positions=positions)])
    engine.pool.decref(pages)
    return logits


def new_visible(j: int) -> list[int]:
    return without_hidden(len(PROMPT) + j)


def test_hiding_a_span_matches_a_context_that_never_had_it(tiny_engine):
    pool = tiny_engine.pool
    want = reference_logits(tiny_engine)
    pages = pool.allocate(tiny_engine.pages_for(len(PROMPT) + len(NEW)))
    tiny_engine.step([masked_prompt(pages)])
    visible = [new_visible(j) for j in range(len(NEW))]
    got = tiny_engine.step([SeqChunk(NEW, len(PROMPT), pages, len(NEW), visible=visible)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the same tokens seeing the span (plain causal) are far off: the mask is what matched
    plain = pool.allocate(len(pages))
    tiny_engine.step([SeqChunk(PROMPT, 0, plain, 0)])
    causal = tiny_engine.step([SeqChunk(NEW, len(PROMPT), plain, len(NEW))])
    assert (causal - want).abs().max() > 1e-2
    pool.decref(pages + plain)
    pool.check_invariants()
    assert pool.num_used == 0


def test_single_token_chunks_with_visible_ranges_take_the_mask(tiny_engine):
    pool = tiny_engine.pool
    want = reference_logits(tiny_engine)
    pages = pool.allocate(tiny_engine.pages_for(len(PROMPT) + len(NEW)))
    tiny_engine.step([masked_prompt(pages)])
    got = [
        tiny_engine.step([SeqChunk([t], len(PROMPT) + j, pages, visible=[new_visible(j)])])
        for j, t in enumerate(NEW)
    ]
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=1e-4)
    pool.decref(pages)
    assert pool.num_used == 0


def test_masked_token_beside_ordinary_decodes_leaves_them_alone(tiny_engine):
    pool = tiny_engine.pool
    want = reference_logits(tiny_engine)
    pages = pool.allocate(tiny_engine.pages_for(len(PROMPT) + 1))
    tiny_engine.step([masked_prompt(pages)])
    others = [list(range(60, 73)), list(range(80, 86))]  # different lengths: padded decode
    tables = [pool.allocate(tiny_engine.pages_for(len(ids) + 1)) for ids in others]
    for ids, table in zip(others, tables, strict=True):
        tiny_engine.step([SeqChunk(ids, 0, table, 0)])
    decodes = [SeqChunk([7], len(ids), t) for ids, t in zip(others, tables, strict=True)]
    alone = torch.cat([tiny_engine.step([c]) for c in decodes])
    masked = SeqChunk(NEW[:1], len(PROMPT), pages, visible=[new_visible(0)])
    # rewriting the decodes' slots with the same tokens writes the same K/V
    got = tiny_engine.step([decodes[0], masked, decodes[1]])
    torch.testing.assert_close(got[1], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[[0, 2]], alone, rtol=1e-4, atol=1e-4)
    pool.decref(pages + tables[0] + tables[1])
    assert pool.num_used == 0


def test_default_positions_given_explicitly_are_bit_identical(tiny_engine):
    pool = tiny_engine.pool
    prefix, new = list(range(3, 11)), [50, 51, 52]
    pages = pool.allocate(tiny_engine.pages_for(len(prefix) + len(new)))
    first = tiny_engine.step([SeqChunk(prefix, 0, pages, len(prefix))])
    again = tiny_engine.step([SeqChunk(prefix, 0, pages, len(prefix), positions=range(8))])
    assert torch.equal(first, again)
    default = tiny_engine.step([SeqChunk(new, 8, pages, 3)])
    explicit = tiny_engine.step([SeqChunk(new, 8, pages, 3, positions=[8, 9, 10])])
    assert torch.equal(default, explicit)
    # shifted away from the prefix: the relative distances, hence the logits, change
    shifted = tiny_engine.step([SeqChunk(new, 8, pages, 3, positions=[13, 14, 15])])
    assert (shifted - default).abs().max() > 1e-2
    pool.decref(pages)
    assert pool.num_used == 0


def test_logit_rows_pick_tokens_in_the_order_asked(tiny_engine):
    pool = tiny_engine.pool
    ids, other = [5, 9, 13, 17, 21], [30, 31, 32]
    one_by_one = pool.allocate(tiny_engine.pages_for(len(ids)))
    singles = torch.cat(
        [tiny_engine.step([SeqChunk([t], j, one_by_one)]) for j, t in enumerate(ids)]
    )
    pages = pool.allocate(len(one_by_one))
    got = tiny_engine.step([SeqChunk(ids, 0, pages, logit_rows=[0, 2, 4])])
    torch.testing.assert_close(got, singles[[0, 2, 4]], rtol=0, atol=1e-4)
    # the order asked, repeats allowed, num_logits ignored; chunk by chunk in a step
    other_pages = pool.allocate(tiny_engine.pages_for(len(other)))
    other_alone = tiny_engine.step([SeqChunk(other, 0, other_pages)])
    both = tiny_engine.step(
        [SeqChunk(ids, 0, pages, 0, logit_rows=[4, 0, 4]), SeqChunk(other, 0, other_pages)]
    )
    torch.testing.assert_close(both[:3], singles[[4, 0, 4]], rtol=0, atol=1e-4)
    torch.testing.assert_close(both[3:], other_alone, rtol=1e-4, atol=1e-4)
    none = tiny_engine.step([SeqChunk(ids, 0, pages, 3, logit_rows=[])])
    assert none.shape == (0, singles.shape[1])
    pool.decref(one_by_one + pages + other_pages)
    assert pool.num_used == 0


@pytest.mark.parametrize(
    "ranges",
    [
        [],  # nothing visible
        [0],  # odd length
        [-1, 5],  # before slot 0
        [0, 6],  # past its own slot (4) + 1
        [3, 5, 0, 2],  # unsorted
        [0, 3, 2, 5],  # overlapping
        [0, 2, 3, 3, 4, 5],  # an empty range
        [0, 3],  # not seeing itself
    ],
)
def test_build_step_input_refuses_malformed_visible_ranges(ranges):
    chunk = SeqChunk([1, 2, 3], 4, [0, 1], visible=[ranges, None, None])
    with pytest.raises(ValueError):
        build_step_input([chunk], 4, "cpu")


def test_build_step_input_accepts_adjacent_ranges_and_checks_list_lengths():
    ok = SeqChunk([1, 2, 3], 4, [0, 1], visible=[[0, 2, 2, 5], None, [1, 7]])
    meta = build_step_input([ok], 4, "cpu").attn
    assert meta.visible == [[[0, 2, 2, 5], None, [1, 7]]]
    for short in ([None, [0, 6]], [None, None]):
        with pytest.raises(ValueError, match="visible lists for 3 tokens"):
            build_step_input([SeqChunk([1, 2, 3], 4, [0, 1], visible=short)], 4, "cpu")
    # all None is plain causal: the batched decode path, not a masked one
    causal = SeqChunk([1], 4, [0, 1], visible=[None])
    assert build_step_input([causal], 4, "cpu").attn.decode_seq_ids == [0]
    with pytest.raises(ValueError, match="positions for 3 tokens"):
        build_step_input([SeqChunk([1, 2, 3], 4, [0, 1], positions=[4, 5])], 4, "cpu")


@pytest.mark.parametrize("rows", [[3], [-1], [0, 1, 2, 3]])
def test_build_step_input_refuses_logit_rows_outside_the_chunk(rows):
    with pytest.raises(ValueError, match="logit rows"):
        build_step_input([SeqChunk([1, 2, 3], 0, [0], logit_rows=rows)], 4, "cpu")


def test_step_refuses_positions_outside_the_rope_table(tiny_engine):
    limit = tiny_engine.model_config.max_position
    pages = tiny_engine.pool.allocate(1)
    for bad in ([limit], [-1], [0, limit + 7]):
        chunk = SeqChunk([1] * len(bad), 0, pages, positions=bad)
        with pytest.raises(ValueError, match="positions"):
            tiny_engine.step([chunk])
    assert tiny_engine.step([SeqChunk([1], 0, pages, positions=[limit - 1])]).shape[0] == 1
    tiny_engine.pool.decref(pages)


def test_flash_backend_hands_masked_steps_to_sdpa(monkeypatch):
    """Without a mask the flash kernel runs; with one, SDPA over the same caches."""
    calls = []
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *args, **kw: calls.append(kw) or args[0]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    flash, sdpa = FlashAttention(4, 2, 16, 4), SdpaAttention(4, 2, 16, 4)
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(2, 8, 4, 2, 16).unbind(0)  # [pages, page_size, kvh, d]
    plain = [SeqChunk([1, 2, 3], 0, [2]), SeqChunk([4], 6, [5, 1])]
    step = build_step_input(plain, 4, "cpu")
    q = torch.randn(4, 4, 16)
    flash(q, k_cache, v_cache, flash.prepare(step.attn))
    assert len(calls) == 1 and calls[0]["causal"]
    masked = [plain[0], SeqChunk([4], 6, [5, 1], visible=[[0, 2, 5, 7]])]
    step = build_step_input(masked, 4, "cpu")
    got = flash(q, k_cache, v_cache, flash.prepare(step.attn))
    assert len(calls) == 1
    assert torch.equal(got, sdpa(q, k_cache, v_cache, sdpa.prepare(step.attn)))
    causal = sdpa(q, k_cache, v_cache, sdpa.prepare(build_step_input(plain, 4, "cpu").attn))
    assert not torch.allclose(got[3], causal[3])
