"""Engine throughput: Symphony (fp32, int8, w8a8) beside transformers and llama.cpp, one run.

Prefill tokens/s on a 512-token prompt, and aggregate decode tokens/s at batch 1, 8 and
32, on the embedded default model. Beside each decode figure: the bytes a step reads
(weights with the LM head, and the KV of every sequence) and the fraction of the
floor they set, bytes over the read bandwidth measured in the same run. Prints a
table, writes bench/results/engine.json and engine.png. llama.cpp (llama-cpp-python,
the `bench` extra) runs at batch 1 only, and only when installed.

Then int8 decode after a 2,048-token context, at batch 1 and 8, with fp32 KV pages and
with bf16 ones (`--kv-dtype bfloat16`): there the fp32 K and V a step reads are half the
int8 weights' bytes at batch 1, four times them at batch 8.

    python bench/engine.py [--quick] [--skip transformers,llamacpp,w8a8,long]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from common import RESULTS, save_results  # bench/common.py

from symphony.engine.batch import SeqChunk
from symphony.engine.config import EngineConfig, ModelConfig
from symphony.engine.default_model import default_model_path
from symphony.engine.engine import Engine
from symphony.engine.model_files import load_model_files
from symphony.engine.quant import linear_bytes

PROMPT_LEN = 512
BATCHES = (1, 8, 32)
LONG_CONTEXT = 2048  # the long-context rows' prompt
LONG_BATCHES = (1, 8)
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
SEED_TEXT = (
    "In the quiet valley where the river bends, the old mill still turns each morning. "
    "Farmers bring grain, children race along the banks, and the miller counts every sack. "
)


def prompt_ids(tokenize: Callable[[str], list[int]], n: int, offset: int = 0) -> list[int]:
    ids: list[int] = []
    while len(ids) < n + offset:
        ids += tokenize(SEED_TEXT)
    return ids[offset : offset + n]


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` sums over 256 MB (far past every cache)."""
    x = torch.ones(2**26)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / min(times)


def kv_bytes(layers: int, kv_heads: int, head_dim: int, element: int, context: int) -> int:
    """Bytes of K and V one decode token reads over `context` positions."""
    return 2 * layers * kv_heads * head_dim * element * context


def bench_symphony(
    engine: Engine,
    steps: int,
    repeats: int,
    batches: tuple[int, ...] = BATCHES,
    prompt_len: int = 32,
    prefill_len: int = PROMPT_LEN,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Prefill tokens/s of one `prefill_len` prompt, and per batch B aggregate decode
    tokens/s (B prompts of `prompt_len`, `steps` greedy steps) with the bytes a step reads.
    `sync` waits for the device (a GPU's queued work) before each clock reading."""
    ids = prompt_ids(engine.tokenizer.encode, prefill_len)
    pool = engine.pool

    def prefill() -> None:
        pages = pool.allocate(engine.pages_for(len(ids)))
        engine.step([SeqChunk(ids, 0, pages)])
        pool.decref(pages)
        sync()

    prefill()  # warm-up
    out = {"prefill": prefill_len / median_time(prefill, repeats)}
    mc = engine.model_config
    element = pool.k_cache[0].element_size()
    kv = kv_bytes(mc.num_layers, mc.num_kv_heads, mc.head_dim, element, prompt_len + 1 + steps // 2)
    for batch in batches:
        prompts = [prompt_ids(engine.tokenizer.encode, prompt_len, offset=i) for i in range(batch)]
        tables = [pool.allocate(engine.pages_for(prompt_len + steps + 1)) for _ in prompts]
        for p, t in zip(prompts, tables, strict=True):  # each run rewrites the same slots
            engine.step([SeqChunk(p, 0, t)])
        rates = []
        for _ in range(repeats):  # the median of `repeats` runs of `steps` steps
            last = [p[-1] for p in prompts]
            chunks = [SeqChunk([tok], prompt_len, t) for tok, t in zip(last, tables, strict=True)]
            engine.step(chunks)
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                pos = prompt_len + 1 + i
                chunks = [SeqChunk([tok], pos, t) for tok, t in zip(last, tables, strict=True)]
                last = engine.step(chunks).argmax(-1).tolist()
            sync()
            rates.append(batch * steps / (time.perf_counter() - t0))
        out[f"decode_b{batch}"] = statistics.median(rates)
        out[f"bytes_b{batch}"] = linear_bytes(engine.model) + batch * kv
        for t in tables:
            pool.decref(t)
    return out


def bench_transformers(steps: int, repeats: int) -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt_ids(lambda s: tok(s).input_ids, PROMPT_LEN)])
    with torch.no_grad():
        model(ids)
        out = {"prefill": PROMPT_LEN / median_time(lambda: model(ids), repeats)}
        for batch in BATCHES:
            batch_ids = torch.tensor(
                [prompt_ids(lambda s: tok(s).input_ids, 32, offset=i) for i in range(batch)]
            )

            def gen(n: int, batch_ids: torch.Tensor = batch_ids) -> None:
                model.generate(
                    batch_ids,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )

            gen(2)
            t_full = median_time(lambda: gen(steps + 1), 1)
            t_first = median_time(lambda: gen(1), repeats)
            out[f"decode_b{batch}"] = batch * steps / (t_full - t_first)
    return out


def bench_llamacpp(steps: int, repeats: int, config: ModelConfig) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(
        model_path=str(default_model_path()),
        n_ctx=2048,
        n_batch=512,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False), PROMPT_LEN)

    def prefill() -> None:
        llm.reset()
        llm.eval(ids)

    prefill()
    out = {"prefill": PROMPT_LEN / median_time(prefill, repeats)}
    short = ids[:32]
    rates = []
    for _ in range(repeats):  # the median of `repeats` runs, as for Symphony
        llm.reset()
        llm.eval(short)
        t0 = time.perf_counter()
        token = short[-1]
        for _ in range(steps):
            llm.eval([token])
            token = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        rates.append(steps / (time.perf_counter() - t0))
    out["decode_b1"] = statistics.median(rates)
    # the GGUF's tensors as stored (what a Q4_1 step reads) and an fp16 KV cache
    from gguf import GGUFReader

    reader = GGUFReader(str(default_model_path()))
    weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    head = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    kv = kv_bytes(config.num_layers, config.num_kv_heads, config.head_dim, 2, 33 + steps // 2)
    out["bytes_b1"] = weights + head + kv  # the tied embedding is the LM head
    return out


def print_table(results: dict[str, dict[str, float]], bandwidth: float) -> None:
    """tokens/s per row, and under each decode figure its MB a step and % of the floor."""
    cols = ["prefill", *(f"decode_b{b}" for b in BATCHES)]
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 256 MB, best of 5)")
    print(f"{'tokens/s':<24}" + "".join(f"{c:>16}" for c in cols))
    for name, row in results.items():
        cells = [f"{row[c]:>16.1f}" if c in row else f"{'-':>16}" for c in cols]
        print(f"{name:<24}" + "".join(cells))
        floors = [""] + [
            f"{row[f'bytes_b{b}'] / 1e6:.0f} MB {row[f'decode_b{b}'] / row[f'floor_b{b}']:.0%}"
            if f"floor_b{b}" in row and f"decode_b{b}" in row
            else ""
            for b in BATCHES
        ]
        if any(floors):
            print(f"{'  bytes/step, of floor':<24}" + "".join(f"{c:>16}" for c in floors))


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in results if "ctx" not in n]  # the long-context rows: the table
    ax1.bar(names, [results[n].get("prefill", 0) for n in names], color="tab:blue")
    ax1.set_title(f"prefill, {PROMPT_LEN}-token prompt")
    ax1.set_ylabel("tokens/s")
    ax1.tick_params(axis="x", labelrotation=15)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j in range(len(BATCHES))]
        ax2.bar(xs, [results[n].get(f"decode_b{b}", 0) for b in BATCHES], width, label=n)
    centres = [j + 0.4 - width / 2 for j in range(len(BATCHES))]
    ax2.set_xticks(centres, [f"batch {b}" for b in BATCHES])
    ax2.set_title("aggregate decode")
    ax2.set_ylabel("tokens/s")
    ax2.legend()
    fig.suptitle(
        f"SmolLM2-135M on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {date.today()}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument(
        "--skip", default="", help="comma list: transformers, llamacpp, fp32, auto, w8a8, long"
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    steps, repeats = (8, 1) if args.quick else (32, 3)
    torch.manual_seed(0)
    files = load_model_files(default_model_path())
    results: dict[str, dict[str, float]] = {}
    bandwidth = read_bandwidth()
    for quant in ("fp32", "auto", "w8a8"):
        if quant in skip:
            continue
        engine = Engine(files, EngineConfig(device="cpu", num_pages=1024, quant=quant))
        name = f"symphony {engine.quant}" + (" (auto)" if quant == "auto" else "")
        results[name] = bench_symphony(engine, steps, repeats)
        del engine
    if "transformers" not in skip:
        results["transformers fp32"] = bench_transformers(steps, repeats)
    if (
        "llamacpp" not in skip
        and (lcpp := bench_llamacpp(steps, repeats, files.config)) is not None
    ):
        results["llama.cpp Q4_1"] = lcpp
    for kv_dtype in () if "long" in skip else ("float32", "bfloat16"):
        config = EngineConfig(device="cpu", num_pages=1536, quant="int8", kv_dtype=kv_dtype)
        engine = Engine(files, config)
        name = f"int8 2k ctx, {SHORT[kv_dtype]} KV"
        results[name] = bench_symphony(engine, steps, repeats, LONG_BATCHES, LONG_CONTEXT)
        del engine

    for row in results.values():  # the floor: tokens/s if a step cost only its reads
        for b in BATCHES:
            if f"bytes_b{b}" in row:
                row[f"floor_b{b}"] = b * bandwidth / row[f"bytes_b{b}"]
    print_table(results, bandwidth)
    path = save_results(
        "engine",
        results,
        read_bandwidth_gbs=round(bandwidth / 1e9, 2),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        steps=steps,
        prompt_len=PROMPT_LEN,
    )
    plot(results, RESULTS / "engine.png")
    print(f"wrote {path} and {RESULTS / 'engine.png'}")


if __name__ == "__main__":
    main()
