"""Programs on the server: syscall latency, LIP-driven decode, fork vs prompts, prompt caching,
and (bench/steer.py) speculative decoding, score, cancel latency, long streams.

Starts `lipctl serve` on the embedded model (twice: prefix index on, then off), drives it
from trio tasks here, each with its own connection, as concurrent programs would.
Prints a table, writes bench/results/lips.json and lips.png.

    python bench/lips.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import steer  # bench/steer.py
import trio
from common import RESULTS, round_trips, save_results  # bench/common.py

from symphony.lipctl import connect as connect_sync
from symphony.lipctl.aio import connect
from symphony.lipctl.launch import start_server, stop_server

# a generate streamed to token 4,100: its tokens 50..150 against 3,950..4,050
STREAM = (4100, (50, 150), (3950, 4050))
WORDS = "the river bends past the mill where farmers bring grain and children race along "


def text_tokens(socket: str, n: int, salt: str = "") -> list[int]:
    with connect_sync(socket) as lip:
        ids: list[int] = []
        while len(ids) < n:
            ids += lip.tokenize(salt + WORDS)
        return ids[:n]


async def timed_programs(programs: int, setup, body) -> float:
    """Run `programs` concurrent programs; time only their bodies, started together."""
    ready, go = trio.Semaphore(0), trio.Event()
    ends: list[float] = []

    async def one(i: int) -> None:
        state = await setup(i)
        ready.release()
        await go.wait()
        await body(i, state)
        ends.append(time.perf_counter())

    async with trio.open_nursery() as nursery:
        for i in range(programs):
            nursery.start_soon(one, i)
        for _ in range(programs):
            await ready.acquire()
        t0 = time.perf_counter()
        go.set()
    return max(ends) - t0


async def per_token_vs_generate(socket: str, programs: int, tokens: int) -> dict[str, float]:
    prompt = text_tokens(socket, 32)
    out = {}
    async with trio.open_nursery() as nursery:
        lips = [await nursery.start(_hold_connection, socket) for _ in range(programs)]
        for mode in ("generate", "lip"):

            async def setup(i: int, mode: str = mode):
                kv = await lips[i].kv(f"pt-{mode}-{i}.kv", create=True)
                await kv.append(prompt[:-1])
                return kv

            async def body(i: int, kv, mode: str = mode) -> None:
                if mode == "generate":
                    await lips[i].call(
                        "generate",
                        path=kv.path,
                        max_tokens=tokens,
                        sampler={"temperature": 0.0},
                        stop=[],
                    )
                else:  # the LIP drives each token: forward it, get the next one back
                    token = prompt[-1]
                    for _ in range(tokens):
                        token = (await kv.forward([token], temperature=0.0)).token
                await kv.unlink()

            out[mode] = programs * tokens / await timed_programs(programs, setup, body)
        nursery.cancel_scope.cancel()
    out["overhead"] = out["generate"] / out["lip"] - 1
    return out


async def _hold_connection(socket: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with connect(socket) as lip:
        task_status.started(lip)
        await trio.sleep_forever()


async def figure2(socket: str, prefix_len: int, branches: int, tokens: int) -> dict[str, float]:
    prefix = text_tokens(socket, prefix_len, "fig2 ")

    async def fork_lip() -> None:
        async with connect(socket) as lip:
            root = await lip.kv("f2-prefix.kv", create=True)
            await root.append(prefix)
            kids = [await root.fork(f"f2-{i}.kv") for i in range(branches)]
            async with trio.open_nursery() as nursery:
                for i, kid in enumerate(kids):
                    nursery.start_soon(
                        partial(kid.generate, max_tokens=tokens, temperature=0.8, seed=i)
                    )
            for kid in [root, *kids]:
                await kid.unlink()

    async def prompt_request(i: int) -> None:
        async with connect(socket) as lip:
            kv = await lip.kv(f"p2-{i}.kv", create=True)
            await kv.append(prefix)
            await kv.generate(max_tokens=tokens, temperature=0.8, seed=i)
            await kv.unlink()

    t0 = time.perf_counter()
    await fork_lip()
    t_fork = time.perf_counter() - t0
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(branches):
            nursery.start_soon(prompt_request, i)
    t_prompts = time.perf_counter() - t0
    return {"fork_s": t_fork, "prompts_s": t_prompts, "speedup": t_prompts / t_fork}


async def prompt_cache(socket: str, system_len: int, requests: int, tokens: int) -> float:
    system = text_tokens(socket, system_len, "system ")

    async def request(i: int) -> None:
        async with connect(socket) as lip:
            kv = await lip.kv(f"pc-{i}.kv", create=True)
            await kv.append(system + await lip.tokenize(f" Question {i}: why?"))
            await kv.generate(max_tokens=tokens, temperature=0.0)
            await kv.unlink()

    await request(-1)  # the first request computes the system prompt (and warms up)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(requests):
            nursery.start_soon(request, i)
    return requests / (time.perf_counter() - t0)


async def aggregate_decode(socket: str, programs: int, tokens: int) -> float:
    prompt = text_tokens(socket, 32, "agg ")
    async with trio.open_nursery() as nursery:
        lips = [await nursery.start(_hold_connection, socket) for _ in range(programs)]

        async def setup(i: int):
            kv = await lips[i].kv(f"agg-{i}.kv", create=True)
            await kv.append(prompt)
            return kv

        async def body(i: int, kv) -> None:
            await lips[i].call(
                "generate", path=kv.path, max_tokens=tokens, sampler={"temperature": 0.0}, stop=[]
            )
            await kv.unlink()

        seconds = await timed_programs(programs, setup, body)
        nursery.cancel_scope.cancel()
    return programs * tokens / seconds


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(13, 8))
    axes = grid[0]
    pt = results["per_token"]
    labels = [f"{n} LIPs" for n in pt]
    axes[0].bar(
        [x - 0.2 for x in range(len(pt))],
        [v["generate"] for v in pt.values()],
        0.4,
        label="server-side generate",
    )
    axes[0].bar(
        [x + 0.2 for x in range(len(pt))],
        [v["lip"] for v in pt.values()],
        0.4,
        label="LIP: forward + sample per token",
    )
    axes[0].set_xticks(range(len(pt)), labels)
    axes[0].set_ylabel("tokens/s")
    axes[0].legend(fontsize=8)
    f2, pc = results["figure2"], results["prompt_cache"]
    axes[1].bar(["fork LIP", "8 prompts"], [f2["fork_s"], f2["prompts_s"]])
    axes[1].set_title(f"Figure 2: {f2['speedup']:.1f}x")
    axes[1].set_ylabel("seconds")
    agg = results["aggregate_decode"]
    axes[2].bar([f"{n} LIPs" for n in agg], list(agg.values()))
    axes[2].set_title(f"aggregate decode; prompt cache {pc['speedup']:.1f}x")
    axes[2].set_ylabel("tokens/s")
    plot_steering(results, grid[1])
    fig.suptitle(f"Symphony on SmolLM2-135M, {platform.machine()}, {date.today()}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_steering(results: dict, axes) -> None:
    sp, sc, st, ca = (results[k] for k in ("speculative", "score", "stream", "cancel"))
    axes[0].bar(["prompt lookup\n+ verify", "generate"], [sp["lookup_tok_s"], sp["generate_tok_s"]])
    axes[0].set_title(f"greedy decode: {sp['speedup']:.2f}x, {sp['mean_accepted']:.1f} accepted")
    axes[0].set_ylabel("tokens/s")
    arms = {
        "score": "score_ms",
        "8 forks\nin turn": "forks_ms",
        "8 forks\nat once": "forks_concurrent_ms",
    }
    axes[1].bar(list(arms), [sc[k] for k in arms.values()])
    axes[1].set_title(f"8 choices: score {sc['speedup']:.1f}x faster than forks in turn")
    axes[1].set_ylabel("ms per selection")
    windows = list(st["windows"])
    for dx, key, label in ((-0.2, "stream_ms", "streamed"), (0.2, "plain_ms", "plain generate")):
        heights = [st["windows"][w][key] for w in windows]
        axes[2].bar([x + dx for x in range(len(windows))], heights, 0.4, label=label)
    axes[2].set_xticks(range(len(windows)), [f"tokens {w}" for w in windows])
    axes[2].set_ylabel("ms per token")
    axes[2].set_title(
        f"cancel {ca['mean_latency_ms']:.0f} ms ({ca['latency_steps']:.2f} steps)", fontsize=10
    )
    axes[2].legend(fontsize=8, loc="lower center")


def print_steering(results: dict) -> None:
    sp, sc, ca, st = (results[k] for k in ("speculative", "score", "cancel", "stream"))
    same = "same tokens" if sp["same_tokens"] else f"DIFFERENT from token {sp['first_difference']}"
    print(
        f"prompt lookup + verify: {sp['lookup_tok_s']:.1f} tok/s vs generate "
        f"{sp['generate_tok_s']:.1f}: {sp['speedup']:.2f}x, {sp['mean_accepted']:.2f} accepted "
        f"per verify, {sp['generated']} tokens, {same}"
    )
    print(
        f"score 8 choices: {sc['score_ms']:.0f} ms vs 8 forks {sc['forks_ms']:.0f} ms "
        f"({sc['speedup']:.1f}x), at once {sc['forks_concurrent_ms']:.0f} ms "
        f"({sc['speedup_vs_concurrent']:.1f}x); same argmax: {sc['same_argmax']}"
    )
    print(
        f"cancel beside {ca['others']} generates: {ca['mean_latency_ms']:.0f} ms mean, "
        f"{ca['max_latency_ms']:.0f} max; step {ca['mean_step_ms']:.0f} ms: "
        f"{ca['latency_steps']:.2f} steps"
    )
    for w, v in st["windows"].items():
        print(
            f"stream, tokens {w}: {v['stream_ms']:.1f} ms/token streamed, {v['plain_ms']:.1f} "
            f"plain generate, overhead {v['overhead_ms']:+.1f} ms"
        )
    print(f"stream late/early: {st['stream_ratio']:.2f}x (plain generate {st['plain_ratio']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    folder = tempfile.mkdtemp(prefix="symphony-bench-")
    socket = os.path.join(folder, "s.sock")
    results: dict = {}
    server = start_server(socket, "--pages", "8192")
    try:
        trio.run(aggregate_decode, socket, 1, 8)  # warm-up
        results["round_trip"] = round_trips(socket, 500 if quick else 3000)
        results["per_token"] = {
            n: trio.run(per_token_vs_generate, socket, n, 8 if quick else 32) for n in (1, 32)
        }
        results["aggregate_decode"] = {
            n: trio.run(aggregate_decode, socket, n, 8 if quick else 32) for n in (1, 8, 32)
        }
        on = trio.run(prompt_cache, socket, 300 if quick else 1500, 8 if quick else 32, 8)
        results["speculative"] = trio.run(steer.speculative, socket, 64 if quick else 300)
        results["score"] = trio.run(steer.score, socket, 2 if quick else 5)
        results["cancel"] = trio.run(steer.cancel_latency, socket, 4, 1 if quick else 5)
        length, early, late = (250, (50, 100), (150, 200)) if quick else STREAM
        results["stream"] = trio.run(steer.stream_cost, socket, length, early, late)
    finally:
        stop_server(server)
    server = start_server(socket, "--pages", "8192", "--no-prefix-cache")
    try:
        off = trio.run(prompt_cache, socket, 300 if quick else 1500, 8 if quick else 32, 8)
        results["figure2"] = trio.run(
            figure2, socket, 256 if quick else 1024, 8, 16 if quick else 64
        )
    finally:
        stop_server(server)
    shutil.rmtree(folder, ignore_errors=True)
    results["prompt_cache"] = {"index_on_rps": on, "index_off_rps": off, "speedup": on / off}

    rt, f2, pc = results["round_trip"], results["figure2"], results["prompt_cache"]
    print(f"no-op syscall round trip: median {rt['median_us']:.0f} us, p99 {rt['p99_us']:.0f} us")
    for n, v in results["per_token"].items():
        print(
            f"{n:>2} programs: generate {v['generate']:.1f} tok/s, LIP per-token "
            f"{v['lip']:.1f} tok/s, overhead {100 * v['overhead']:+.1f}%"
        )
    print(
        f"Figure 2: fork LIP {f2['fork_s']:.1f} s, prompt serving {f2['prompts_s']:.1f} s, "
        f"{f2['speedup']:.2f}x"
    )
    print(
        f"prompt cache: {pc['index_on_rps']:.2f} req/s on, {pc['index_off_rps']:.2f} off, "
        f"{pc['speedup']:.1f}x"
    )
    for n, v in results["aggregate_decode"].items():
        print(f"aggregate decode, {n:>2} LIPs: {v:.1f} tok/s")
    print_steering(results)
    path = save_results("lips", results, quick=quick)
    plot(results, RESULTS / "lips.png")
    print(f"wrote {path} and {RESULTS / 'lips.png'}")


if __name__ == "__main__":
    main()
