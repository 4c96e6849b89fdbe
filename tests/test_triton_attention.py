"""The Triton paged-attention backend against SDPA over gathered pages (the reference
backend): on the GPU where there is one, else on the CPU in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, TOLERANCE  # first: it sets TRITON_INTERPRET

pytest.importorskip("triton", reason="triton is not installed (pip install '.[gpu]')")

from symphony.engine.attention import SdpaAttention
from symphony.engine.batch import SeqChunk, build_step_input
from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.engine.generate import generate
from symphony.engine.triton_attention import TritonAttention
from tests.tiny import tiny_model_files

PAGE = 16
HEADS, KV_HEADS = 6, 2


def both_backends(chunks, head_dim=32, pages=40, page=PAGE):
    """(triton's, sdpa's) attention [tokens, heads, head_dim] of random Q, K and V."""
    torch.manual_seed(0)
    step = build_step_input(chunks, page, DEVICE)
    tokens = step.token_ids.shape[0]
    q = torch.randn(tokens, HEADS, head_dim, device=DEVICE)
    k_cache = torch.randn(pages, page, KV_HEADS, head_dim, device=DEVICE)
    v_cache = torch.randn(pages, page, KV_HEADS, head_dim, device=DEVICE)
    k_cache[7] *= 6  # one page's keys sharp: attention far from uniform
    results = []
    for backend in (
        TritonAttention(HEADS, KV_HEADS, head_dim, page),
        SdpaAttention(HEADS, KV_HEADS, head_dim, page),
    ):
        results.append(backend(q, k_cache, v_cache, backend.prepare(step.attn)))
    return results


def chunk(n, start, table, visible=None, positions=None):
    return SeqChunk(list(range(n)), start, table, 0, positions=positions, visible=visible)


@pytest.mark.parametrize("head_dim", [32, 48])  # 48: the head padded to a block of 64
def test_decode_over_scattered_shared_and_partial_pages(head_dim):
    shared = [7, 3, 30]
    chunks = [
        chunk(1, 40, shared),  # slot 40: its last page has 9 of 16 slots
        chunk(1, 47, shared),  # a fork reading the same pages, one page further
        chunk(1, 0, [12]),  # a first token: one key
        chunk(1, 95, [39, 0, 5, 11, 7, 21]),  # six pages in no order, the last full
    ]
    got, want = both_backends(chunks, head_dim)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_prefill_chunks_with_history_beside_decode():
    chunks = [
        chunk(37, 0, [4, 9, 2]),  # a prompt over three pages, the last partial
        chunk(1, 20, [7, 1]),
        chunk(20, 25, [15, 16, 8]),  # a chunk after 25 cached slots, across a page end
        chunk(3, 13, [30]),
    ]
    got, want = both_backends(chunks)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_pages_of_256_are_read_in_blocks_of_64():
    """flash-attn's page size, on the triton backend (auto's fallback keeps it)."""
    chunks = [chunk(1, 300, [7, 2]), chunk(70, 130, [3]), chunk(1, 0, [5])]
    hide = [[0, 10, 200, 201 + j] for j in range(3)]
    chunks.append(chunk(3, 200, [1], visible=hide))
    got, want = both_backends(chunks, pages=8, page=256)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_visible_ranges_and_explicit_positions():
    # a prompt hiding slots 3..6 from its later tokens; a branch seeing only its root
    # and itself; a causal chunk in the same step
    hide = [None if s < 7 else [0, 3, 7, s + 1] for s in range(12)]
    branch = [[0, 4, 20, 21 + j] for j in range(3)]
    chunks = [
        chunk(12, 0, [2, 5], visible=hide),
        chunk(3, 20, [9, 10], visible=branch, positions=[4, 5, 6]),
        chunk(5, 10, [11], positions=[100, 101, 102, 103, 104]),
        chunk(1, 30, [12, 13]),
    ]
    got, want = both_backends(chunks)
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_the_engine_on_triton_gives_sdpas_tokens_and_logits():
    """The whole model: prompts, a masked chunk with positions, greedy decode."""
    files = tiny_model_files()
    engines = [
        Engine(files, EngineConfig(DEVICE, "float32", num_pages=64, quant="fp32", attention=a))
        for a in ("triton", "sdpa")
    ]
    assert [e.attention.name for e in engines] == ["triton", "sdpa"]
    logits = []
    for e in engines:
        pages = e.pool.allocate(3)
        e.step([SeqChunk(list(range(5, 25)), 0, pages, 0)])
        visible = [[0, 8, 20, 21 + j] for j in range(4)]
        masked = SeqChunk([1, 2, 3, 4], 20, pages, 4, positions=[8, 9, 10, 11], visible=visible)
        logits.append(e.step([masked]))
        e.pool.decref(pages)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    prompts = [list(range(10, 50)), list(range(60, 63))]
    assert generate(engines[0], prompts, max_tokens=8) == generate(
        engines[1], prompts, max_tokens=8
    )


def test_small_pages_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least 16"):
        TritonAttention(HEADS, KV_HEADS, 32, 8)
