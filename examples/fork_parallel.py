"""Parallel generation from a shared prefix (the Symphony paper's Figure 2).

The prompt is prefilled once into a KV file; every branch is a copy-on-write fork of
it (no page copied) and all branches generate at once over one connection.

    lipctl run examples/fork_parallel.py [BRANCHES] [MAX_TOKENS]
"""

import sys
import time

import trio

from symphony.lipctl.aio import connect

BRANCHES = int(sys.argv[1]) if len(sys.argv) > 1 else 4
MAX_TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 32
QUESTION = "Give me one idea for a weekend project. Start with a verb."


async def main() -> None:
    async with connect() as lip:
        await lip.mkdir("fig2", parents=True)
        prefix = await lip.kv(f"fig2/prefix-{time.time_ns()}.kv", create=True)
        t0 = time.perf_counter()
        await prefix.append(await lip.apply_chat_template([{"role": "user", "content": QUESTION}]))
        t_prefill = time.perf_counter() - t0
        branches = [await prefix.fork(f"{prefix.path[:-3]}-{i}.kv") for i in range(BRANCHES)]
        texts = [""] * BRANCHES

        async def run(i: int) -> None:
            # branch 0 greedy, the others sampled with their own seeds
            result = await branches[i].generate(
                max_tokens=MAX_TOKENS, temperature=0.0 if i == 0 else 0.8, seed=i
            )
            texts[i] = result.text

        t1 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(BRANCHES):
                nursery.start_soon(run, i)
        t_generate = time.perf_counter() - t1
        for i, text in enumerate(texts):
            print(f"branch {i}: {text.strip()!r}")
        stats = [await b.stat() for b in branches]
        prefix_stat = await prefix.stat()
        print(
            f"prefix: {prefix_stat['tokens']} tokens in {prefix_stat['pages']} pages, "
            f"shared by every branch: {min(s['shared_pages'] for s in stats)} pages each"
        )
        print(
            f"timings: prefill {t_prefill:.2f} s, {BRANCHES} branches generated in "
            f"{t_generate:.2f} s ({sum(s['tokens'] - prefix_stat['tokens'] for s in stats)} "
            "tokens)"
        )
        for b in branches:
            await b.unlink()
        await prefix.unlink()


trio.run(main)
