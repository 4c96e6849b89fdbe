"""Greedy results must not depend on what else is in the batch or where the pages lie."""

from __future__ import annotations

import random

import pytest
import torch

from symphony.engine.batch import SeqChunk, build_step_input
from symphony.engine.generate import generate

TOPICS = [
    "Tell me about the deep blue ocean.",
    "Why is the sky blue? Answer in detail, please, as if to a child.",
    "List three fruits.",
    "Write a short poem about autumn leaves falling on a quiet town square at dusk.",
    "What is 12 times 7?",
    "Describe a small black cat.",
    "Explain how a bicycle works, step by step, with attention to gears and brakes.",
    "Hi",
]


@pytest.mark.slow
def test_batch_of_eight_decodes_as_each_alone(real_engine):
    tok = real_engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in TOPICS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all different lengths
    together = generate(real_engine, prompts, max_tokens=16)
    alone = [generate(real_engine, [p], max_tokens=16)[0] for p in prompts]
    assert together == alone
    assert real_engine.pool.num_used == 0


def _prefill_logits(engine, ids, pages):
    return engine.step([SeqChunk(ids, 0, pages, num_logits=len(ids))])


def test_scattered_pages_give_the_same_logits_as_contiguous(tiny_engine):
    pool = tiny_engine.pool
    ids = list(range(3, 40))
    n = tiny_engine.pages_for(len(ids))
    contiguous = pool.allocate(n)
    assert contiguous == list(range(n))
    expected = _prefill_logits(tiny_engine, ids, contiguous)
    pool.decref(contiguous)
    # take every page, then keep a shuffled, non-contiguous selection
    everything = pool.allocate(pool.num_pages)
    scattered = random.Random(1).sample(everything[n:], n)
    pool.decref([p for p in everything if p not in scattered])
    got = _prefill_logits(tiny_engine, ids, scattered)
    assert torch.equal(got, expected)
    # decode one more token on each layout too
    more = SeqChunk([7], len(ids), scattered)
    got_next = tiny_engine.step([more])
    pool.decref(scattered)
    contiguous = pool.allocate(n)
    _prefill_logits(tiny_engine, ids, contiguous)
    want_next = tiny_engine.step([SeqChunk([7], len(ids), contiguous)])
    pool.decref(contiguous)
    assert torch.equal(got_next, want_next)
    pool.check_invariants()
    assert pool.num_used == 0


def test_mixed_step_of_prefill_and_decode_matches_separate_steps(tiny_engine):
    """One step mixing a prefill chunk and decode tokens equals running them apart."""
    pool = tiny_engine.pool
    a_ids, b_ids = list(range(10, 30)), list(range(50, 61))
    a, b = pool.allocate(tiny_engine.pages_for(21)), pool.allocate(tiny_engine.pages_for(12))
    tiny_engine.step([SeqChunk(a_ids, 0, a, 0)])
    mixed = tiny_engine.step([SeqChunk([5], 20, a), SeqChunk([*b_ids, 6], 0, b, 2)])
    a2, b2 = pool.allocate(len(a)), pool.allocate(len(b))
    tiny_engine.step([SeqChunk(a_ids, 0, a2, 0)])
    sep_a = tiny_engine.step([SeqChunk([5], 20, a2)])
    sep_b = tiny_engine.step([SeqChunk([*b_ids, 6], 0, b2, 2)])
    torch.testing.assert_close(mixed, torch.cat([sep_a, sep_b]), rtol=1e-4, atol=1e-4)
    pool.decref(a + b + a2 + b2)
    assert pool.num_used == 0


def test_step_refuses_a_block_table_too_short(tiny_engine):
    pages = tiny_engine.pool.allocate(1)
    with pytest.raises(ValueError, match="cannot hold"):
        tiny_engine.step([SeqChunk(list(range(9)), 0, pages)])
    tiny_engine.pool.decref(pages)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
def test_decoding_forks_of_one_prefix_together_matches_each_alone(tiny_engine, kernel):
    """Forks share their prefix pages; their joint decode step reads each page once: in
    the CPU kernel, where each row's result is bitwise its own alone, or without it by
    SDPA over the distinct pages."""
    if not kernel:
        tiny_engine.attention._kernels = None
    elif tiny_engine.attention._kernels is None:
        pytest.skip("the CPU kernels do not run here")
    pool = tiny_engine.pool
    prefix = list(range(3, 31))  # 7 full pages of 4
    shared = pool.allocate(7)
    tiny_engine.step([SeqChunk(prefix, 0, shared, 0)])
    tables = [[*shared, *pool.allocate(1)] for _ in range(5)]
    chunks = [SeqChunk([40 + i], len(prefix), t) for i, t in enumerate(tables)]
    plan = tiny_engine.attention.prepare(build_step_input(chunks, 4, "cpu").attn)
    together = tiny_engine.step(chunks)
    alone = torch.cat([tiny_engine.step([c]) for c in chunks])
    if kernel:  # the path under test
        assert plan.kernel is not None and plan.decode is None
        assert torch.equal(together, alone)
    else:
        assert plan.decode is not None and plan.decode.shared_pages is not None
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    pool.decref(shared)
    pool.decref([t[-1] for t in tables])
    assert pool.num_used == 0


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "sdpa"])
def test_a_step_of_forks_a_short_chunk_and_a_long_one_matches_each_alone(tiny_engine, kernel):
    """Every path of the CPU attention in one step (forks' decodes and a short chunk in
    the kernel, or the forks over their shared pages by SDPA without it; a chunk with
    explicit visible ranges through SDPA), each row as its sequence alone gives it."""
    if not kernel:
        tiny_engine.attention._kernels = None
    elif tiny_engine.attention._kernels is None:
        pytest.skip("the CPU kernels do not run here")
    pool = tiny_engine.pool
    prefix = list(range(3, 31))  # 7 full pages of 4
    shared = pool.allocate(7)
    tiny_engine.step([SeqChunk(prefix, 0, shared, 0)])
    forks = [[*shared, *pool.allocate(1)] for _ in range(4)]
    short, long = pool.allocate(tiny_engine.pages_for(12)), pool.allocate(tiny_engine.pages_for(40))
    tiny_engine.step([SeqChunk(list(range(40, 49)), 0, short, 0)])
    chunks = [SeqChunk([40 + i], len(prefix), t) for i, t in enumerate(forks)]
    causal = [[0, j + 1] for j in range(40)]  # causal, spelled out: SDPA's masked path
    masked = SeqChunk(list(range(60, 100)), 0, long, 2, visible=causal)
    chunks += [SeqChunk([7, 8, 9], 9, short, 3), masked]
    plan = tiny_engine.attention.prepare(build_step_input(chunks, 4, "cpu").attn)
    if tiny_engine.attention._kernels is not None:  # the paths under test
        assert plan.kernel is not None and plan.kernel.rows is not None
    else:
        assert plan.decode is not None and plan.decode.shared_pages is not None
    assert plan.prefills
    together = tiny_engine.step(chunks)
    # alone: the forks re-decode their (rewritten, same) slots; the chunks over copies
    alone = [tiny_engine.step([c]) for c in chunks[:4]]
    short2, long2 = pool.allocate(len(short)), pool.allocate(len(long))
    tiny_engine.step([SeqChunk(list(range(40, 49)), 0, short2, 0)])
    alone.append(tiny_engine.step([SeqChunk([7, 8, 9], 9, short2, 3)]))
    alone.append(tiny_engine.step([SeqChunk(list(range(60, 100)), 0, long2, 2, visible=causal)]))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)
    pool.decref(shared + [t[-1] for t in forks] + short + long + short2 + long2)
    assert pool.num_used == 0
