"""The GPU engine in one call: build, check and time each attention backend.

For the embedded SmolLM2-135M and a Llama-3.2-1B-shaped model with random weights, and
for each attention backend that runs on the device (sdpa, triton, flash):
- check: the logits of one mixed step (a prefill chunk after a cached prefix, beside
  decode tokens) against sdpa's, top-1 and max |difference| (bf16 tolerance);
- prefill tokens/s: one 512-token prompt in one step;
- decode tokens/s at batch 1, 8, 32, 64, 128 and 256 (128-token prompts, greedy), beside
  its floor: B x copy rate / (weight bytes + B x KV bytes a step), the copy rate being
  a measured device-to-device copy (bytes read + written over time).

    python bench/gpu.py              # on a CUDA machine: results/gpu.json
    python bench/gpu.py --dry-run    # the same code on the CPU, tiny shapes (CI runs it)

--dry-run runs sdpa and triton (in Triton's interpreter) on two tiny random models, so
the script cannot rot while no GPU is lent; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 64, 128, 256)
# Llama-3.2-1B's geometry (its vocabulary too: the LM head is a fifth of the bytes)
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    rope_theta=500000.0,
    max_position=8192,
    tie_embeddings=True,
    name="llama-3.2-1b-shape",
)
TOLERANCE = 2e-2  # of the largest |logit|: bf16 keeps 8 bits of mantissa


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no GPU")
    parser.add_argument("--out", type=Path, help="the JSON results (default results/gpu.json)")
    parser.add_argument("--backends", default="sdpa,triton,flash", help="comma list to try")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.dry_run:  # before triton is imported: triton.jit reads it when it decorates
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # bench/ first: its engine.py, not the repository's engine/ folder, is `engine` here
    sys.path[:0] = [str(REPO / "bench"), str(REPO)]
    import torch

    from symphony.engine.attention import choose_attention

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (--dry-run runs on the CPU)", file=sys.stderr)
        return 2
    shape = Shape.dry() if args.dry_run else Shape.full()
    backends = []  # sdpa first: the reference every other backend is checked against
    for name in ["sdpa", *(b for b in args.backends.split(",") if b != "sdpa")]:
        try:
            backends.append(choose_attention(name, device)[0])
        except ValueError as exc:
            print(f"skipped: {exc}")
    rate = copy_rate(device, shape.copy_bytes)
    print(f"device {describe(device)}; copy rate {rate / 1e9:.1f} GB/s (read + write)")
    results: dict[str, Any] = {}
    for model_name, files in models(args.dry_run):
        results[model_name] = {}
        reference = None
        for backend in backends:
            row, logits = measure(files, backend, device, shape, rate)
            if reference is None:
                reference = logits
            row |= agreement(logits, reference)
            results[model_name][backend] = row
        print_table(model_name, results[model_name], shape.batches)
    out = args.out or (None if args.dry_run else REPO / "bench" / "results" / "gpu.json")
    if out is not None:
        meta = {"device": describe(device), "copy_rate_gbs": round(rate / 1e9, 1)}
        meta |= {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {out}")
    failed = [f"{m}/{b}" for m, rows in results.items() for b, r in rows.items() if not r["agrees"]]
    if failed:
        print(f"backends disagreeing with sdpa: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


class Shape:
    """Sizes of one run: the full one on a GPU, or the dry run's."""

    def __init__(self, batches: tuple[int, ...], prompt: int, prefill: int, steps: int, copy: int):
        self.batches, self.prompt, self.prefill = batches, prompt, prefill
        self.steps, self.copy_bytes = steps, copy

    @classmethod
    def full(cls) -> Shape:
        return cls(BATCHES, prompt=128, prefill=512, steps=16, copy=2**30)

    @classmethod
    def dry(cls) -> Shape:
        return cls((1, 2), prompt=20, prefill=40, steps=2, copy=2**22)


def describe(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def models(dry_run: bool) -> list[tuple[str, Any]]:
    from symphony.engine.default_model import default_model_path
    from symphony.engine.model_files import load_model_files
    from tests.tiny import tiny_model_files

    if dry_run:  # two tiny models, the second shaped like the 1B one (GQA 4:1, tied)
        one_b = dict(num_heads=8, num_kv_heads=2, tie_embeddings=True, name="1b-shape-tiny")
        return [("tiny", tiny_model_files()), ("1b-shape-tiny", tiny_model_files(**one_b))]
    return [
        ("smollm2-135m", load_model_files(default_model_path())),
        ("llama-3.2-1b-shape", tiny_model_files(**LLAMA_1B)),
    ]


def copy_rate(device: str, nbytes: int) -> float:
    """Bytes/s of the best of five device copies (each byte read once, written once)."""
    import torch

    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def measure(files: Any, backend: str, device: str, shape: Shape, rate: float):
    """(figures, check logits) of one model on one backend."""
    import torch

    from engine import bench_symphony  # bench/engine.py: the same timing as the CPU's
    from symphony.engine.attention import choose_attention
    from symphony.engine.config import EngineConfig
    from symphony.engine.engine import Engine

    page_size = choose_attention(backend, device)[1]
    # the largest batch's contexts, or the check's three and the prefill, with room over
    per_seq = -(-max(shape.prompt + shape.steps + 1, 100) // page_size)
    num_pages = (max(shape.batches) + 3) * per_seq + shape.prefill // page_size + 8
    config = EngineConfig(device=device, num_pages=num_pages, quant="fp32", attention=backend)
    engine = Engine(files, config)
    logits = check_logits(engine)
    row: dict[str, Any] = {"page_size": engine.page_size}
    row |= bench_symphony(
        engine, shape.steps, 1, shape.batches, shape.prompt, shape.prefill, lambda: sync(device)
    )
    for b in shape.batches:
        row[f"floor_b{b}"] = b * rate / row[f"bytes_b{b}"]
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    return row, logits


def check_logits(engine: Any):
    """Logits of one mixed step: a chunk after a cached prefix, beside two decodes."""
    from symphony.engine.batch import SeqChunk

    vocab = min(engine.model_config.vocab_size, 256)
    prompts = [[(5 * i + s) % vocab for i in range(40 + 9 * s)] for s in range(3)]
    tables = [engine.pool.allocate(engine.pages_for(len(p) + 30)) for p in prompts]
    engine.step([SeqChunk(p, 0, t, 0) for p, t in zip(prompts, tables, strict=True)])
    chunks = [
        SeqChunk(list(range(1, 25)), len(prompts[0]), tables[0], 24),  # 24 after 40 cached
        SeqChunk([9], len(prompts[1]), tables[1]),
        SeqChunk([11], len(prompts[2]), tables[2]),
    ]
    logits = engine.step(chunks).float().cpu()
    for t in tables:
        engine.pool.decref(t)
    return logits


def agreement(logits: Any, reference: Any) -> dict[str, Any]:
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    diff = (logits - reference).abs().max().item()
    bound = TOLERANCE * reference.abs().max().item()
    return {"top1_vs_sdpa": top1, "max_diff_vs_sdpa": diff, "agrees": diff <= bound}


def print_table(model: str, rows: dict[str, dict[str, Any]], batches: tuple[int, ...]) -> None:
    print(f"\n{model}: tokens/s (percent of the floor)")
    head = f"{'backend':<8}{'page':>6}{'check':>8}{'prefill':>10}"
    print(head + "".join(f"{'b' + str(b):>16}" for b in batches))
    for name, r in rows.items():
        check = "ok" if r["agrees"] else "FAIL"
        line = f"{name:<8}{r['page_size']:>6}{check:>8}{r['prefill']:>10.0f}"
        for b in batches:
            cell = f"{r[f'decode_b{b}']:.0f} ({100 * r[f'decode_b{b}'] / r[f'floor_b{b}']:.0f}%)"
            line += f"{cell:>16}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
