"""The compiled CPU kernels compute what the torch ops they replace compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from symphony.engine import cpu_kernels, group_int8
from symphony.engine.batch import SeqChunk, build_step_input
from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.engine.generate import generate
from symphony.engine.group_int8 import pack_blocks, pack_lanes, quantize_groups, vnni_available
from symphony.engine.rope import apply_rope
from tests.tiny import tiny_model_files

kernels = cpu_kernels.load()
pytestmark = pytest.mark.skipif(
    kernels is None, reason="the CPU kernels do not build or run on this CPU"
)
# "int8-vnni": the int8 layers on the AVX-512 VNNI kernel, where this CPU has it
INT8_VNNI = pytest.param(
    "int8-vnni",
    marks=pytest.mark.skipif(not vnni_available(kernels), reason="this CPU lacks AVX-512 VNNI"),
)


def use_vnni(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """int8 layers made from now on take the VNNI kernel (on) or the AVX2 one."""
    monkeypatch.setattr(group_int8, "vnni_available", lambda k: k is not None and on)


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_rms_norm(rows):
    x, w = torch.randn(rows, 576) * 5, torch.randn(576)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), want)


def test_silu_mul_matches_torch_and_keeps_nan():
    gate_up = torch.randn(3, 2 * 1540) * 30  # gates far past where e^-x overflows fp32
    gate_up[1, 7] = float("nan")
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, equal_nan=True)


def test_rope_store_kv_matches_torch_and_zeroes_non_finite_values():
    torch.manual_seed(0)
    t, nh, nkv, d = 5, 4, 2, 16
    qkv = torch.randn(t, (nh + 2 * nkv) * d)
    qkv[1, (nh + 0) * d + 3] = float("nan")  # a K value
    qkv[2, (nh + nkv) * d + 5] = float("inf")  # a V value
    angles = torch.rand(t, d // 2) * 10
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 0, 31, 12, 13])
    k_cache, v_cache = torch.full((4, 8, nkv, d), 9.0), torch.full((4, 8, nkv, d), 9.0)
    q = kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slots, k_cache, v_cache)
    qk = apply_rope(qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d), cos[:, None], sin[:, None])
    torch.testing.assert_close(q, qk[:, :nh])
    k = torch.nan_to_num(qk[:, nh:], 0.0, 0.0, 0.0)
    v = torch.nan_to_num(qkv[:, (nh + nkv) * d :].view(t, nkv, d), 0.0, 0.0, 0.0)
    torch.testing.assert_close(k_cache.view(-1, nkv, d)[slots], k)
    torch.testing.assert_close(v_cache.view(-1, nkv, d)[slots], v)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache.view(-1, nkv, d)[untouched] == 9.0).all()
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slots + 32, k_cache, v_cache)


def assert_attention_matches_sdpa(q, k_cache, v_cache, tables, lens, starts=None):
    """Row t of sequence s (rows starts[s]..starts[s + 1], one each by default) against
    the first lens[t] slots of tables[s], as SDPA over those slots gathered."""
    nh, d, nkv = q.shape[1], q.shape[2], k_cache.shape[2]
    starts = list(range(len(tables) + 1)) if starts is None else starts
    got = kernels.paged_attention(
        q, k_cache, v_cache, torch.tensor(tables), torch.tensor(starts), torch.tensor(lens), d**-0.5
    )
    for s, table in enumerate(tables):
        for t in range(starts[s], starts[s + 1]):
            k = k_cache[table].flatten(0, 1)[: lens[t]].transpose(0, 1)  # [nkv, n, d]
            v = v_cache[table].flatten(0, 1)[: lens[t]].transpose(0, 1)
            qt = q[t].view(nkv, nh // nkv, d)
            want = F.scaled_dot_product_attention(qt, k, v).reshape(nh, d)
            torch.testing.assert_close(got[t], want)


# fp32_mm streams in AVX-512 where the CPU has it; fp32_mm_avx2 is its AVX2 stream anywhere
FP32_PATHS = ["fp32_mm", "fp32_mm_avx2"]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 17, 64])
# tails past the 16- and 32-input passes: 8 (no pass), 40, 48, 56 (8, 16, 24 past 32), 1576
@pytest.mark.parametrize("inputs", [8, 40, 48, 56, 576, 1576])
@pytest.mark.parametrize("path", FP32_PATHS)
def test_fp32_mm_matches_linear(path, rows, inputs):
    mm = getattr(kernels, path)
    x, w = torch.randn(rows, inputs), torch.randn(130, inputs)
    torch.testing.assert_close(mm(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        mm(x[:, :-1], w[:, :-1])


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split()}


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="this CPU lacks AVX-512")
def test_fp32_mm_takes_the_avx512_stream_where_the_cpu_has_it():
    """The engine's fp32 decodes run the AVX-512 stream here, not the AVX2 one: its sums
    of 16 lanes round apart from the AVX2 stream's 8 in some last bits."""
    assert kernels.fp32_avx512_supported()
    torch.manual_seed(5)
    x, w = torch.randn(1, 1576), torch.randn(130, 1576)
    assert not torch.equal(kernels.fp32_mm(x, w), kernels.fp32_mm_avx2(x, w))


def test_paged_attention_matches_sdpa_over_gathered_pages():
    torch.manual_seed(0)
    nh, nkv, d, ps = 6, 2, 32, 4
    k_cache, v_cache = torch.randn(20, ps, nkv, d), torch.randn(20, ps, nkv, d)
    # scattered pages, a shared one, partial last pages, lengths 1 to 13
    tables = [[3, 17, 5, 9], [9, 0, 0, 0], [11, 2, 3, 0]]
    lens = [13, 1, 10]
    q = torch.randn(3, nh, d)
    assert_attention_matches_sdpa(q, k_cache, v_cache, tables, lens)
    starts, bad = torch.tensor([0, 1, 2, 3]), torch.tensor(tables) + 20
    with pytest.raises(RuntimeError, match="outside"):
        kernels.paged_attention(q, k_cache, v_cache, bad, starts, torch.tensor(lens), 1.0)
    with pytest.raises(RuntimeError, match="from 0 to the rows"):
        kernels.paged_attention(
            q, k_cache, v_cache, torch.tensor(tables), starts - 1, torch.tensor(lens), 1.0
        )
    # a decreasing pair is refused before it bounds a loop (rows 0..5 of 3 would overrun)
    with pytest.raises(RuntimeError, match="must not decrease"):
        kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            torch.tensor(tables),
            torch.tensor([0, 5, 2, 3]),
            torch.tensor(lens),
            1.0,
        )


def test_paged_attention_of_chunks_is_causal_within_each():
    """Several query rows a sequence (a verify, a Jacobi window): row j of a chunk of n
    after c cached slots sees c + j + 1 of them, and a row past its table is refused."""
    torch.manual_seed(2)
    nh, nkv, d, ps = 9, 3, 64, 16
    k_cache, v_cache = torch.randn(24, ps, nkv, d), torch.randn(24, ps, nkv, d)
    tables = [[4, 19, 7], [2, 0, 0], [8, 9, 10]]
    starts = [0, 5, 6, 9]  # a 5-token chunk, a decode, a 3-token chunk
    lens = [36, 37, 38, 39, 40, 12, 1, 2, 3]
    q = torch.randn(9, nh, d)
    assert_attention_matches_sdpa(q, k_cache, v_cache, tables, lens, starts)
    too_long = torch.tensor([*lens[:-1], 49])
    with pytest.raises(RuntimeError, match="outside its table"):
        kernels.paged_attention(
            q, k_cache, v_cache, torch.tensor(tables), torch.tensor(starts), too_long, 1.0
        )


def test_rows_sharing_pages_are_computed_as_each_alone():
    """Forks of one prefix, a sequence sharing only its first page with them, a chunk
    and a decode of their own: read together against the shared pages (each 8 keys once
    for up to 4 rows), every row is bitwise what it is in a call of its own, and SDPA's."""
    torch.manual_seed(3)
    nh, nkv, d, ps = 9, 3, 64, 16
    k_cache, v_cache = torch.randn(40, ps, nkv, d), torch.randn(40, ps, nkv, d)
    prefix = [5, 11, 2, 30, 7]  # 5 pages, then each fork's own
    tables = [
        [*prefix, 20, 0],  # forks, 75..90 slots: shared 75 (not a multiple of 8)
        [*prefix, 21, 22],
        [*prefix, 23, 0],
        [5, 1, 3, 4, 0, 0, 0],  # shares the first page only: a group of its own
        [*prefix, 24, 25],  # a 6-token chunk after 90 slots on the prefix
        [33, 34, 0, 0, 0, 0, 0],  # a decode alone
        [*prefix, 26, 0],
    ]
    starts = [0, 1, 2, 3, 4, 10, 11, 12]
    lens = [75, 90, 81, 50, 91, 92, 93, 94, 95, 96, 20, 88]
    q = torch.randn(len(lens), nh, d)
    assert_attention_matches_sdpa(q, k_cache, v_cache, tables, lens, starts)
    together = kernels.paged_attention(
        q, k_cache, v_cache, torch.tensor(tables), torch.tensor(starts), torch.tensor(lens), 0.125
    )
    for s, table in enumerate(tables):
        for t in range(starts[s], starts[s + 1]):
            alone = kernels.paged_attention(
                q[t : t + 1],
                k_cache,
                v_cache,
                torch.tensor([table]),
                torch.tensor([0, 1]),
                torch.tensor([lens[t]]),
                0.125,
            )
            assert torch.equal(together[t], alone[0]), f"row {t}"


def test_rows_are_grouped_by_the_pages_they_share():
    """Forks of one prefix go together over their shared slots, whatever comes first: a
    sequence sharing one page with them, or shorter ones sharing less, start groups of
    their own instead of cutting the forks' sharing short."""
    prefix = [5, 11, 2, 30, 7, 8, 9, 10]  # 8 pages of 16

    def groups(tables, lens, starts=None):
        starts = list(range(len(tables) + 1)) if starts is None else starts
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        got = kernels.attention_groups(
            torch.tensor(padded), torch.tensor(starts), torch.tensor(lens), 16
        )
        return sorted((shared, sorted(rows)) for shared, rows in got)

    forks = [[*prefix, 20 + i] for i in range(5)]
    stranger, half, quarter = [5, 1], [*prefix[:5], 3], [*prefix[:2], 6]
    assert groups([stranger, *forks], [20, 130, 129, 140, 131, 133]) == [
        (20, [0]),
        (128, [1, 2, 3, 4, 5]),
    ]
    # half the forks' 9 pages (5) joins them, sharing 80 slots; a quarter does not
    assert groups([*forks[:2], half, quarter], [130, 131, 90, 40]) == [(40, [3]), (80, [0, 1, 2])]
    # a chunk's rows: the slots the first of them sees
    assert groups([forks[0]], [125, 126, 127], [0, 3]) == [(125, [0, 1, 2])]
    with pytest.raises(RuntimeError, match="must not decrease"):
        groups(forks[:3], [125, 126], [0, 2, 1, 2])


@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 80: a 64-wide block and a part
def test_paged_attention_over_long_contexts(head_dim):
    """Contexts of many 8-key blocks and a tail, spread over shuffled pages."""
    torch.manual_seed(1)
    nh, nkv, ps = 9, 3, 16
    k_cache, v_cache = torch.randn(64, ps, nkv, head_dim), torch.randn(64, ps, nkv, head_dim)
    k_cache[5] *= 8  # sharp attention: one page's keys dominate
    order = torch.randperm(64).tolist()
    tables = [order[:32], order[32:], order[10:42]]
    lens = [512, 8, 301]
    q = torch.randn(3, nh, head_dim)
    assert_attention_matches_sdpa(q, k_cache, v_cache, tables, lens)


def test_short_chunks_in_the_kernel_give_what_sdpa_gives(monkeypatch):
    """A verify's draft or a Jacobi window (a few tokens after a cached prefix, beside
    a decode and a longer chunk) through the kernel: the logits of SDPA over gathered
    pages, every row."""
    engine = Engine(tiny_model_files(), EngineConfig(device="cpu", num_pages=64, quant="fp32"))
    pool = engine.pool

    def run() -> torch.Tensor:
        tables = [pool.allocate(engine.pages_for(n)) for n in (40, 30, 60)]
        engine.step([SeqChunk(list(range(10, 45)), 0, tables[0], 0)])
        engine.step([SeqChunk(list(range(60, 89)), 0, tables[1], 0)])
        logits = engine.step(
            [
                SeqChunk([5, 9, 11, 3, 7], 35, tables[0], 5),  # a short chunk: the kernel
                SeqChunk([8], 29, tables[1]),  # a decode
                SeqChunk(list(range(100, 140)), 0, tables[2], 3),  # a longer one
            ]
        )
        for table in tables:
            pool.decref(table)
        return logits

    assert (
        engine.attention.prepare(
            build_step_input([SeqChunk([5, 9], 3, [0])], engine.page_size, "cpu").attn
        ).kernel
        is not None
    )  # the path under test
    with_kernel = run()
    monkeypatch.setattr(engine.attention, "_kernels", None)
    torch.testing.assert_close(with_kernel, run(), rtol=1e-4, atol=1e-4)
    assert pool.num_used == 0


@pytest.mark.parametrize(
    "quant",
    [
        "fp32",
        "int8",
        INT8_VNNI,
    ],
)
def test_the_engine_without_kernels_gives_the_same_tokens(monkeypatch, quant):
    """The torch-only path (a CPU without AVX2, or no compiler) stays correct. It
    computes int8 layers with fp32 activations, as the AVX2 kernel does; the VNNI
    kernel's int16 ones move the tiny model's logits by about 1e-4."""
    vnni = quant == "int8-vnni"
    use_vnni(monkeypatch, vnni)
    prompts = [list(range(10, 50)), list(range(60, 75))]
    config = EngineConfig(device="cpu", num_pages=64, quant=quant.removesuffix("-vnni"))
    with_kernels = Engine(tiny_model_files(), config)
    want_logits = with_kernels.prompt_logits(prompts[0])
    want = generate(with_kernels, prompts, max_tokens=12)
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    without = Engine(tiny_model_files(), config)
    tol = {"rtol": 1e-3, "atol": 1e-3} if vnni else {}
    torch.testing.assert_close(without.prompt_logits(prompts[0]), want_logits, **tol)
    assert generate(without, prompts, max_tokens=12) == want


# part blocks of 1 and 2 of 3 channels (AVX2), and of 16 channels alone and in a pair (VNNI)
@pytest.mark.parametrize("channels", [130, 131, 149])
@pytest.mark.parametrize(
    "weights",
    [
        "fp32",
        "fp32-avx2",
        "int8",
        INT8_VNNI,
    ],
)
def test_a_row_gets_the_same_bits_whatever_rows_are_beside_it(weights, channels):
    """The matmul kernels sum every row in one order, however many rows a call has (a
    decode alone or in a batch, a chunk whole or after a prefix-cache hit):
    bitwise the same, through the stream and the tiles with their row tails."""
    torch.manual_seed(3)
    # int8 in whole groups of 32; fp32 with a tail of 8 past the 16- and 32-input passes
    inputs = 1576 if weights.startswith("fp32") else 1568
    w = torch.randn(channels, inputs)
    if weights == "fp32":
        mm = lambda x: kernels.fp32_mm(x, w)  # noqa: E731
    elif weights == "fp32-avx2":
        mm = lambda x: kernels.fp32_mm_avx2(x, w)  # noqa: E731
    elif weights == "int8-vnni":
        q, scales, zeros = pack_lanes(*quantize_groups(w))
        mm = lambda x: kernels.group_int8_vnni_mm(x, q, scales, zeros, channels)  # noqa: E731
    else:
        q, scales, zeros = pack_blocks(*quantize_groups(w))
        mm = lambda x: kernels.group_int8_mm(x, q, scales, zeros, channels)  # noqa: E731
    x = torch.randn(130, inputs)
    alone = torch.cat([mm(x[i : i + 1]) for i in range(130)])
    most = 130 if weights == "int8-vnni" else 64  # the VNNI kernel runs every step
    for rows in [r for r in (2, 3, 4, 5, 8, 11, 12, 13, 14, 15, 63, 64, 65, 130) if r <= most]:
        assert torch.equal(mm(x[:rows]), alone[:rows]), rows


@pytest.mark.parametrize(
    "quant,qkv_bias",
    [
        ("fp32", False),
        ("fp32", True),
        ("int8", True),
        pytest.param(
            "int8-vnni",
            False,
            marks=pytest.mark.skipif(
                not vnni_available(kernels), reason="this CPU lacks AVX-512 VNNI"
            ),
        ),
    ],
)
def test_the_compiled_decoder_gives_the_layers_bits(monkeypatch, quant, qkv_bias):
    """Decodes and short chunks go through every layer in one compiled call
    (engine/cpu_decoder.cpp): bitwise the logits of the layers run one by one."""
    vnni = quant == "int8-vnni"
    use_vnni(monkeypatch, vnni)
    files = tiny_model_files(qkv_bias=qkv_bias)
    config = EngineConfig(device="cpu", num_pages=64, quant=quant.removesuffix("-vnni"))
    engine = Engine(files, config)
    model = type(engine.model)
    fused_steps = []
    decoder = model._decoder

    def counted(self, rows):  # type: ignore[no-untyped-def]
        found = decoder(self, rows)
        fused_steps.append(found is not None)
        return found

    def run() -> list[torch.Tensor]:
        pool = engine.pool
        tables = [pool.allocate(4) for _ in range(3)]
        out = [engine.step([SeqChunk(list(range(10, 40)), 0, tables[0])])]
        out.append(engine.step([SeqChunk(list(range(50, 70)), 0, t) for t in tables[1:]]))
        out.append(  # three decodes, then a short chunk beside a decode
            engine.step([SeqChunk([7], 30, tables[0]), *(SeqChunk([8], 20, t) for t in tables[1:])])
        )
        out.append(
            engine.step([SeqChunk([9, 10, 11], 31, tables[0]), SeqChunk([3], 21, tables[1])])
        )
        for t in tables:
            pool.decref(t)
        return out

    monkeypatch.setattr(model, "_decoder", counted)
    fused = run()
    assert fused_steps[-2:] == [True, True]  # the decodes and the short chunk went fused
    monkeypatch.setattr(model, "_decoder", lambda self, rows: None)
    for got, want in zip(fused, run(), strict=True):
        assert torch.equal(got, want)
    assert engine.pool.num_used == 0


@pytest.mark.parametrize(
    "kernel",
    [
        "int8",
        INT8_VNNI,
    ],
)
def test_a_prompt_in_chunks_gets_the_bits_of_the_whole(monkeypatch, kernel):
    """Every unmasked chunk goes to the attention kernel, which computes a row as it
    would alone, and so do the int8 kernels (the AVX2 one up to 64 rows): a prompt
    computed whole, in chunks, or after a prefix-cache hit gets the same K/V and the
    same logits, bit for bit."""
    vnni = kernel == "int8-vnni"
    use_vnni(monkeypatch, vnni)
    engine = Engine(tiny_model_files(), EngineConfig(device="cpu", num_pages=64, quant="int8"))
    ids = [(7 * i) % 200 + 3 for i in range(60)]
    pages = engine.pool.allocate(engine.pages_for(len(ids)))
    whole = engine.step([SeqChunk(ids, 0, pages, num_logits=5)])
    for cuts in ([37], [10, 30, 50]):
        for start, end in zip([0, *cuts], [*cuts, len(ids) - 5], strict=True):
            engine.step([SeqChunk(ids[start:end], start, pages, num_logits=0)])
        again = engine.step([SeqChunk(ids[-5:], len(ids) - 5, pages, num_logits=5)])
        assert torch.equal(again, whole), cuts
    engine.pool.decref(pages)
