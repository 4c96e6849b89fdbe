"""The program library against prompt serving (issue 13): every program of examples/ that
has a row (bench/programs_*.py), timed as a LIP and as the same job done by prompt
serving (bench/prompt_serving.py), side by side in one run on the embedded model.

The LIP forms run on a server with its prefix cache, the prompt forms on one started
with `--no-prefix-cache`: a fresh server for each form of each row, one after the
other, never two at once. Prints a table, writes
bench/results/programs.json and programs.png (the ratios).

    python bench/programs.py [--only NAME,NAME] [--quant auto|fp32|int8|w8a8]

`--only` runs some rows and prints them without writing the results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import prompt_serving  # bench/prompt_serving.py
import trio
from common import RESULTS, save_results  # bench/common.py
from program_rows import Row

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.launch import start_server, stop_server

ROW_MODULES = ["programs_speculation", "programs_search", "programs_agents", "programs_steering"]
# the Symphony paper's Figure 2: prefix tokens, branches, tokens each
FIGURE2 = {"prefix_len": 1024, "branches": 8, "tokens": 64}
WORDS = "the river bends past the mill where farmers bring grain and children race along "


async def _prefix(lip: AsyncLip, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += await lip.tokenize(WORDS)
    return ids[:n]


async def figure2_lip(lip: AsyncLip, prefix_len: int, branches: int, tokens: int) -> dict:
    """One prefill, `branches` copy-on-write forks generating at once."""
    prefix = await _prefix(lip, prefix_len)
    await lip.mkdir("figure2", parents=True)
    root = await lip.kv(f"figure2/{os.getpid()}-{time.time_ns()}.kv", create=True)
    kids = []
    try:
        await root.append(prefix)
        kids = [await root.fork(f"{root.path[:-3]}-{i}.kv") for i in range(branches)]
        texts = [""] * branches

        async def branch(i: int) -> None:
            texts[i] = (await kids[i].generate(max_tokens=tokens, temperature=0.8, seed=i)).text

        async with trio.open_nursery() as nursery:
            for i in range(branches):
                nursery.start_soon(branch, i)
        return {"output": texts}
    finally:
        for kv in [root, *kids]:
            await kv.unlink()


async def figure2_prompts(lip: AsyncLip, prefix_len: int, branches: int, tokens: int) -> dict:
    """`branches` requests of the whole prefix each, at once."""
    prefix = await _prefix(lip, prefix_len)
    texts = [""] * branches

    async def request(i: int) -> None:
        result = await prompt_serving.generate(
            lip, prefix, max_tokens=tokens, temperature=0.8, seed=i
        )
        texts[i] = result.text

    async with trio.open_nursery() as nursery:
        for i in range(branches):
            nursery.start_soon(request, i)
    return {"output": texts}


def all_rows() -> dict[str, Row]:
    rows = {
        "figure2": Row(
            "fork_parallel.py (Figure 2: 1,024-token prefix, 8 branches of 64 tokens)",
            "fork",
            partial(figure2_lip, **FIGURE2),
            partial(figure2_prompts, **FIGURE2),
        )
    }
    for name in ROW_MODULES:  # every one: a module gone is an error, not rows left out
        for row in importlib.import_module(name).ROWS:
            rows[Path(row.program).stem] = row
    return rows


async def timed_form(socket: str, row: Row, side: str) -> dict[str, Any]:
    """One row's `side` form ("lip" or "prompts"): its seconds and its result."""
    async with connect(socket) as lip:
        warm = await lip.kv(f"warm-{os.getpid()}.kv", create=True)  # first-step costs
        await warm.append(await lip.tokenize("warm up"))
        await warm.generate(max_tokens=4, temperature=0.0)
        await warm.unlink()
        form = row.lip if side == "lip" else row.prompts
        t0 = time.perf_counter()
        result = await form(lip)
        return {"seconds": time.perf_counter() - t0, "result": result}


def timed_forms(socket: str, rows: dict[str, Row], side: str, server_args: list[str]) -> dict:
    """Each row's `side` form on a server of its own (so no prefix cache is left by the
    row before), in a process of its own (a program is a process: each starts with fresh
    seeded streams, which belong to the process), one after the other."""
    out = {}
    for name in rows:
        server = start_server(socket, *server_args)
        try:
            argv = [sys.executable, __file__, "--one", name, "--side", side, "--socket", socket]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
        finally:
            stop_server(server)
        if done.returncode:
            raise SystemExit(f"{side} form of {name} failed:\n{done.stderr}")
        out[name] = json.loads(done.stdout.splitlines()[-1])
        print(f"  {side:>7} {name}: {out[name]['seconds']:.2f} s", flush=True)
    return out


def compare(rows: dict[str, Row], lip: dict, prompts: dict) -> dict[str, dict[str, Any]]:
    table = {}
    for name, row in rows.items():
        a, b = lip[name], prompts[name]
        entry: dict[str, Any] = {
            "program": row.program,
            "uses": row.uses,
            "prompt_s": b["seconds"],
            "lip_s": a["seconds"],
            "ratio": b["seconds"] / a["seconds"],
            "same_output": all(a["result"].get(k) == b["result"].get(k) for k in row.same_keys)
            if row.same_output
            else None,
        }
        if row.quality:
            entry["quality"] = row.quality
            entry["lip_quality"] = a["result"].get("quality")
            entry["prompt_quality"] = b["result"].get("quality")
        table[name] = entry
    return table


def print_table(table: dict[str, dict[str, Any]]) -> None:
    head = f"{'program':<24} {'uses':<30} {'prompts s':>9} {'LIP s':>7} {'ratio':>6}"
    print(f"\n{head}  same  quality")
    for name, e in table.items():
        same = {True: "yes", False: "NO", None: "-"}[e["same_output"]]
        quality = ""
        if "quality" in e:
            lip, prompts = (_figure(e[k]) for k in ("lip_quality", "prompt_quality"))
            quality = f"LIP {lip}, prompts {prompts} ({e['quality']})"
        print(
            f"{name:<24} {e['uses'][:30]:<30} {e['prompt_s']:>9.2f} {e['lip_s']:>7.2f} "
            f"{e['ratio']:>5.2f}x  {same:<4}  {quality}"
        )


def _figure(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    ratios = [table[n]["ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.8), 5))
    ax.bar(range(len(names)), ratios, color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(2.0, color="tab:red", linestyle="--", linewidth=0.8, label="2x (fork-based target)")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("prompt-serving time / LIP time")
    ax.set_title("Programs against prompt serving, same model, same machine")
    for i, r in enumerate(ratios):
        ax.text(i, r, f"{r:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated row names (default all)")
    parser.add_argument("--quant", default=None, help="the servers' --quant (default theirs)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: run one form, print JSON
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = all_rows()
    if args.one:
        print(json.dumps(trio.run(timed_form, args.socket, rows[args.one], args.side)))
        return
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in rows]
        if unknown:
            parser.error(f"no rows {unknown}; there are {sorted(rows)}")
        rows = {n: rows[n] for n in wanted}
    folder = tempfile.mkdtemp(prefix="symphony-programs-")
    socket = os.path.join(folder, "s.sock")
    extra = ["--pages", "8192", *(["--quant", args.quant] if args.quant else [])]
    results = {}
    try:
        for side, flags in (("lip", []), ("prompts", ["--no-prefix-cache"])):
            results[side] = timed_forms(socket, rows, side, [*extra, *flags])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = compare(rows, results["lip"], results["prompts"])
    print_table(table)
    if args.only:
        return  # a part of the table: printed, not saved
    path = save_results("programs", table, quant=args.quant or "default")
    plot(table, RESULTS / "programs.png")
    print(f"wrote {path} and {RESULTS / 'programs.png'}")


if __name__ == "__main__":
    main()
