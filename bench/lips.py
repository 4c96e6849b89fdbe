"""Programs on the server: syscall latency, LIP-driven decode, fork vs prompts, prompt caching.

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

import trio
from common import RESULTS, round_trips, save_results  # bench/common.py

from symphony.lipctl import connect as connect_sync
from symphony.lipctl.aio import connect
from symphony.lipctl.launch import start_server, stop_server

WORDS = "the river bends past the mill where farmers bring grain and children race along "


def text_tokens(socket: str, n: int, salt: str = "") -> list[int]:
    with connect_sync(socket) as lip:
        ids: list[int] = []
        while len(ids) < n:
            ids += lip.tokenize(salt + WORDS)
        return ids[:n]


async def timed_programs(programs: int, setup, body) -> float:  # type: ignore[no-untyped-def]
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

            async def setup(i: int, mode: str = mode):  # type: ignore[no-untyped-def]
                kv = await lips[i].kv(f"pt-{mode}-{i}.kv", create=True)
                await kv.append(prompt[:-1])
                return kv

            async def body(i: int, kv, mode: str = mode) -> None:  # type: ignore[no-untyped-def]
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
                        token = (await kv.forward([token], temperature=0.0))["token"]
                await kv.unlink()

            out[mode] = programs * tokens / await timed_programs(programs, setup, body)
        nursery.cancel_scope.cancel()
    out["overhead"] = out["generate"] / out["lip"] - 1
    return out


async def _hold_connection(socket: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
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

        async def setup(i: int):  # type: ignore[no-untyped-def]
            kv = await lips[i].kv(f"agg-{i}.kv", create=True)
            await kv.append(prompt)
            return kv

        async def body(i: int, kv) -> None:  # type: ignore[no-untyped-def]
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

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
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
    fig.suptitle(f"Symphony on SmolLM2-135M, {platform.machine()}, {date.today()}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
    path = save_results("lips", results, quick=quick)
    plot(results, RESULTS / "lips.png")
    print(f"wrote {path} and {RESULTS / 'lips.png'}")


if __name__ == "__main__":
    main()
