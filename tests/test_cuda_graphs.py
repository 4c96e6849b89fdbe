"""Decode steps through the CUDA-graph runner's static buffers and padding.

On a GPU, real graphs. On a CPU the recording is replaced by EagerReplay (replaying
runs the same function over the same buffers again), with the triton backend in
Triton's interpreter: what is tested is everything around the recording.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_device import DEVICE, INTERPRETED  # first: it sets TRITON_INTERPRET

pytest.importorskip("triton", reason="triton is not installed (pip install '.[gpu]')")

from symphony.engine.batch import SeqChunk
from symphony.engine.config import EngineConfig
from symphony.engine.cuda_graphs import DecodeGraphs, EagerReplay, capture_cuda
from symphony.engine.engine import Engine
from symphony.engine.generate import generate
from symphony.fs.store import KVStore
from tests.tiny import tiny_model_files

PROMPTS = [list(range(10, 50)), list(range(60, 63)), list(range(70, 90))]
CAPTURE = EagerReplay if INTERPRETED else capture_cuda  # a GPU records real graphs


def engines():
    config = EngineConfig(DEVICE, "float32", num_pages=64, quant="fp32", attention="triton")
    plain, graphed = Engine(tiny_model_files(), config), Engine(tiny_model_files(), config)
    graphed.graphs = DecodeGraphs(  # buckets 1 and 4 (the interpreter is slow)
        graphed.model, graphed.pool, graphed.attention, 2048, capture=CAPTURE, buckets=(1, 4)
    )
    return plain, graphed


def test_replayed_decode_gives_the_eager_tokens_and_touches_no_real_page():
    plain, graphed = engines()
    # three sequences: bucket 4, one padding row writing only the scratch page
    assert generate(graphed, PROMPTS, max_tokens=10) == generate(plain, PROMPTS, max_tokens=10)
    assert graphed.pool.num_free == graphed.pool.num_pages - 1  # the scratch page, no leak
    # the scratch page is the engine's own: the store's invariants count it
    store = KVStore(graphed.pool, graphed.fingerprint, graphed.model_config.vocab_size, 512)
    store.check_invariants()


def test_a_replayed_step_matches_eager_logits_with_explicit_positions():
    plain, graphed = engines()
    logits = []
    for e in (plain, graphed):
        tables = [e.pool.allocate(4) for _ in PROMPTS]
        for p, t in zip(PROMPTS, tables, strict=True):
            e.step([SeqChunk(p, 0, t, 0)])
        # positions moved (a LIP's explicit positions) and a fork sharing pages
        chunks = [
            SeqChunk([5], len(PROMPTS[0]), tables[0], positions=[100]),
            SeqChunk([6], len(PROMPTS[1]), tables[1]),
            SeqChunk([7], len(PROMPTS[2]), tables[2], positions=[3]),
            SeqChunk([8], len(PROMPTS[0]) + 1, tables[0]),  # the slot after the first's
        ]
        logits.append(e.step(chunks[:3]))  # bucket 4, one padding row
        logits.append(e.step(chunks[3:]))  # bucket 1
    torch.testing.assert_close(logits[2], logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[3], logits[1], rtol=1e-4, atol=1e-4)


def test_what_a_graph_cannot_run_goes_eager_and_bad_tables_are_refused():
    _, graphed = engines()
    t = graphed.pool.allocate(2)
    prefill = SeqChunk(PROMPTS[0][:20], 0, t)
    assert not graphed.graphs.fits([prefill])
    graphed.step([prefill])
    assert not graphed.graphs.fits([SeqChunk([1], 20, t)] * 5)  # past the largest bucket
    with pytest.raises(ValueError, match="cannot hold"):
        graphed.step([SeqChunk([1], 32, t[:1])])
    with pytest.raises(ValueError, match="2 positions for 1 tokens"):  # eager's check
        graphed.step([SeqChunk([1], 20, t, positions=[5, 6])])


def test_graphs_need_cuda_and_a_backend_that_reads_tables_on_the_device():
    with pytest.raises(ValueError, match="need a CUDA device"):
        EngineConfig(device="cpu", cuda_graphs=True)
    engine = Engine(tiny_model_files(), EngineConfig(device="cpu", num_pages=8, quant="fp32"))
    with pytest.raises(ValueError, match="triton or flash"):
        DecodeGraphs(engine.model, engine.pool, engine.attention, 2048)
