"""bf16 KV pages under an fp32 model on the CPU (`--kv-dtype bfloat16`): half the bytes a
page holds, values rounded to nearest even as torch rounds them, the same tokens by the
kernels and by torch's ops, and files that say their dtype and refuse another's."""

from __future__ import annotations

import pytest
import torch

from symphony.engine import cpu_kernels
from symphony.engine.config import EngineConfig
from symphony.engine.generate import generate
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine
from tests.test_kv_import import export
from tests.test_store import append

kernels = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(
    kernels is None, reason="the CPU kernels do not build or run on this CPU"
)
PROMPTS = [list(range(10, 50)), list(range(60, 75))]


@needs_kernels
def test_rope_store_kv_rounds_into_bf16_pages_as_torch_does():
    torch.manual_seed(0)
    t, nh, nkv, d = 6, 4, 2, 16
    qkv = torch.randn(t, (nh + 2 * nkv) * d) * 30
    qkv[1, nh * d + 3] = float("nan")  # made 0, as in fp32 pages
    qkv[2, (nh + nkv) * d + 1] = 3.4e38  # finite in fp32, past bf16's largest: that
    angles = torch.rand(t, d // 2) * 10
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 0, 31, 12, 13, 2])
    wide = [torch.zeros(4, 8, nkv, d) for _ in range(2)]
    narrow = [torch.zeros(4, 8, nkv, d, dtype=torch.bfloat16) for _ in range(2)]
    q32 = kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slots, *wide)
    q16 = kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slots, *narrow)
    assert torch.equal(q16, q32)  # Q stays fp32
    top = torch.finfo(torch.bfloat16).max
    for full, half in zip(wide, narrow, strict=True):
        assert torch.equal(half, full.clamp(-top, top).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="both fp32 or both bf16"):
        kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slots, wide[0], narrow[1])


@needs_kernels
def test_attention_over_bf16_pages_is_attention_over_their_values():
    """Widening bf16 is exact: the same bits as fp32 pages holding the rounded values."""
    torch.manual_seed(1)
    nh, nkv, d, ps = 6, 2, 64, 4
    k16 = torch.randn(20, ps, nkv, d).to(torch.bfloat16)
    v16 = torch.randn(20, ps, nkv, d).to(torch.bfloat16)
    tables = torch.tensor([[3, 17, 5, 9], [9, 0, 0, 0], [11, 2, 3, 0]])
    lens, starts = torch.tensor([13, 1, 10, 11, 12]), torch.tensor([0, 1, 2, 5])
    q = torch.randn(5, nh, d)
    got = kernels.paged_attention(q, k16, v16, tables, starts, lens, d**-0.5)
    want = kernels.paged_attention(q, k16.float(), v16.float(), tables, starts, lens, d**-0.5)
    assert torch.equal(got, want)


def test_a_bf16_pool_holds_pages_of_half_the_bytes():
    wide, narrow = make_tiny_engine(), make_tiny_engine(kv_dtype="bfloat16")
    assert narrow.pool.k_cache[0].dtype == torch.bfloat16
    assert 2 * narrow.pool.bytes_per_page == wide.pool.bytes_per_page
    with pytest.raises(ValueError, match="bfloat16 under float32"):
        EngineConfig(device="cpu", kv_dtype="float16")
    with pytest.raises(ValueError, match="takes KV pages of the model's dtype"):
        EngineConfig(device="cpu", kv_dtype="bfloat16", attention="triton")
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        EngineConfig(device="cpu", kv_dtype="int4")


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_bf16_pages_give_the_same_tokens_with_and_without_kernels(monkeypatch, quant):
    """And nearly fp32 pages' logits: bf16 keeps 8 bits of each K and V."""
    engine = make_tiny_engine(kv_dtype="bfloat16", quant=quant)
    logits = engine.prompt_logits(PROMPTS[0])
    tokens = generate(engine, PROMPTS, max_tokens=12)
    full = make_tiny_engine(quant=quant).prompt_logits(PROMPTS[0])
    torch.testing.assert_close(logits, full, rtol=0.0, atol=0.05)
    assert not torch.equal(logits, full)  # the pages do hold bf16
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    without = make_tiny_engine(kv_dtype="bfloat16", quant=quant)
    torch.testing.assert_close(without.prompt_logits(PROMPTS[0]), logits, rtol=1e-3, atol=1e-3)
    assert generate(without, PROMPTS, max_tokens=12) == tokens


def test_bf16_files_say_their_dtype_and_an_fp32_server_refuses_them():
    narrow, wide = make_tiny_engine(kv_dtype="bfloat16"), make_tiny_engine()
    stores = [
        KVStore(e.pool, e.fingerprint, e.model_config.vocab_size, 512) for e in (narrow, wide)
    ]
    file = stores[0].ns.create_file("a.kv", ROOT, 0o600, stores[0].domain_of(ROOT))
    append(narrow, stores[0], file, PROMPTS[0])
    data = export(stores[0], "a.kv")
    assert b'"dtype":"bfloat16"' in data.replace(b" ", b"")
    again = stores[0].ns.create_file("b.kv", ROOT, 0o600, stores[0].domain_of(ROOT))
    importer = stores[0].importer(ROOT)
    importer.write(0, data)
    assert importer.complete()
    stores[0].commit_import(again, importer)
    assert stores[0].pool.max_abs_diff(file.pages, again.pages, len(PROMPTS[0])) == 0.0
    refused = stores[1].importer(ROOT)
    with pytest.raises(StoreError) as err:
        refused.write(0, data)
    assert err.value.errno == 22  # EINVAL
    refused.abort()
    assert stores[1].pool.num_used == 0


def test_a_bf16_server_says_so_and_serves(tmp_path):
    from symphony.lipctl import connect
    from symphony.lipctl.cli import format_status
    from tests.server_helpers import ServerThread

    engine = make_tiny_engine(num_pages=64, kv_dtype="bfloat16")
    want = generate(engine, PROMPTS[:1], max_tokens=8)[0]
    thread = ServerThread(engine, str(tmp_path / "s.sock"))
    thread.start()
    try:
        with connect(thread.server.config.socket_path) as lip:
            status = lip.call("status")
            assert (status["dtype"], status["kv_dtype"]) == ("float32", "bfloat16")
            assert f"float32, {status['quant']} weights, bfloat16 KV" in format_status(status)
            kv = lip.kv("a.kv", create=True)
            kv.append(PROMPTS[0])
            assert kv.generate(max_tokens=8, temperature=0.0).token_ids == want
            # decode steps' K/V against one recomputing prefill: the same within a
            # rounding step of bf16
            report = kv.kv_verify()
            assert report["match"] and report["relative_tolerance"] == 2.0**-7
    finally:
        thread.stop()
    assert thread.error is None
