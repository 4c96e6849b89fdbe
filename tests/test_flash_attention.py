"""Which attention backend runs, with which page size; flash-attn's paged backend
agrees with SDPA over gathered pages (CUDA only)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from symphony.engine import attention
from symphony.engine.attention import choose_attention, flash_attn_available, make_attention
from symphony.engine.batch import SeqChunk, build_step_input


def test_a_cpu_runs_sdpa_and_refuses_flash():
    assert choose_attention("auto", "cpu") == ("sdpa", 16)
    assert choose_attention("sdpa", "cpu", 64) == ("sdpa", 64)
    with pytest.raises(ValueError, match="flash attention backend needs CUDA"):
        choose_attention("flash", "cpu")


def test_auto_on_cuda_takes_the_fast_kernel_or_says_why_not(monkeypatch, caplog):
    """flash with its 256-token pages; else triton, else SDPA: each fallback one line."""
    caplog.set_level(logging.WARNING, logger="symphony.engine.attention")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert choose_attention("auto", "cuda") == ("flash", 256)
    assert not caplog.records
    assert choose_attention("auto", "cuda", 16) == ("triton", 16)  # pages flash cannot read
    assert [r.getMessage() for r in caplog.records] == [
        "attention: triton (flash needs a page size that is a multiple of 256, not 16)"
    ]
    with pytest.raises(ValueError, match="multiple of 256, not 16"):
        choose_attention("flash", "cuda", 16)
    caplog.clear()
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails
    assert choose_attention("auto", "cuda") == ("sdpa", 16)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "flash needs the flash_attn package" in line and "triton needs the triton" in line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not flash_attn_available(), reason="needs the flash_attn package (gpu extra)")
def test_flash_matches_sdpa_on_paged_kv():
    torch.manual_seed(0)
    heads, kv_heads, dim, page_size, pages = 8, 2, 64, 256, 16
    shape = (pages, page_size, kv_heads, dim)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    chunks = [
        SeqChunk(list(range(300)), 0, [3, 7]),  # prefill across two scattered pages
        SeqChunk([1], 700, [1, 9, 4]),  # decode
        SeqChunk(list(range(40)), 100, [12]),  # chunked prefill after a prefix
    ]
    step = build_step_input(chunks, page_size, "cuda")
    q = torch.randn(step.token_ids.numel(), heads, dim, device="cuda", dtype=torch.bfloat16)
    sdpa = make_attention("sdpa", heads, kv_heads, dim, page_size)
    flash = make_attention("flash", heads, kv_heads, dim, page_size)
    want = sdpa(q, k_cache, v_cache, sdpa.prepare(step.attn))
    got = flash(q, k_cache, v_cache, flash.prepare(step.attn))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_backends_bigger_pages_keep_the_pools_tokens(monkeypatch):
    """--pages counts 16-token pages when the backend chose the size (flash's 256)."""
    from symphony.engine import engine as engine_module
    from symphony.engine.config import EngineConfig
    from symphony.engine.engine import Engine
    from tests.tiny import tiny_model_files

    monkeypatch.setattr(engine_module, "choose_attention", lambda *args: ("sdpa", 64))
    chosen = Engine(tiny_model_files(), EngineConfig("cpu", num_pages=128, quant="fp32"))
    assert (chosen.page_size, chosen.pool.num_pages) == (64, 32)
    monkeypatch.setattr(engine_module, "choose_attention", lambda *args: ("sdpa", args[2]))
    given = Engine(tiny_model_files(), EngineConfig("cpu", page_size=64, num_pages=128))
    assert (given.page_size, given.pool.num_pages) == (64, 128)  # a size asked for: as said
