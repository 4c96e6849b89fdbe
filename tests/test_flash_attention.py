"""flash-attn's paged backend agrees with SDPA over gathered pages (CUDA only)."""

from __future__ import annotations

import pytest
import torch

from symphony.engine.attention import flash_attn_available, make_attention
from symphony.engine.batch import SeqChunk, build_step_input

pytestmark = pytest.mark.gpu


def test_auto_picks_sdpa_without_cuda():
    backend = make_attention("auto", 4, 2, 16, 16, "cpu")
    assert backend.name == "sdpa"
    with pytest.raises(ValueError, match="flash attention backend needs CUDA"):
        make_attention("flash", 4, 2, 16, 16, "cpu")


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
    sdpa = make_attention("sdpa", heads, kv_heads, dim, page_size, "cuda")
    flash = make_attention("flash", heads, kv_heads, dim, page_size, "cuda")
    want = sdpa(q, k_cache, v_cache, sdpa.prepare(step.attn))
    got = flash(q, k_cache, v_cache, flash.prepare(step.attn))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
