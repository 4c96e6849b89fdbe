"""Tree of Thoughts (Yao et al. 2023, arXiv:2305.10601), breadth-first with a value
prompt, on a number puzzle: reach a target from given numbers with + - *.

The puzzle prompt is prefilled once. Each level forks every kept state into `branches`
copy-on-write children (`kv.fork`) that each sample one thought, a line such as
"2 * 3 = 6 (left: 6 4)" (`kv.generate_stream`, seeded, up to the newline). Branches are
pruned mid-thought by cancelling their generate (the server stops within a step): one
whose thought is unlikely so far (mean token logprob under `floor`), and one running on
past the `keep` thoughts of its level that have ended. Each thought is valued on a fork of
its state ("Is the last step correct? Answer:", then `kv.score([" yes", " no"])`); the
best `keep` states go on, every other file is unlinked.

    lipctl run examples/tree_of_thought.py ["NUMBERS" [TARGET [BRANCHES [KEEP]]]]

It prints `best path (value V, solved S):`, then the path and what was pruned.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.lipctl.aio import AsyncKV, AsyncLip, connect
from symphony.lipctl.scratch import remove_run

EXAMPLES = (
    "Combine the numbers with + - * to reach the target, one step a line.\n"
    "Numbers: 1 4 6. Target: 30.\n1 + 4 = 5 (left: 5 6)\n5 * 6 = 30 (left: 30)\n"
    "Numbers: 2 3 5. Target: 11.\n2 * 3 = 6 (left: 6 5)\n6 + 5 = 11 (left: 11)\n"
    "Numbers: 2 5 6. Target: 17.\n2 * 6 = 12 (left: 12 5)\n12 + 5 = 17 (left: 17)\n"
    "Numbers: 3 7 8. Target: 80.\n3 + 7 = 10 (left: 10 8)\n10 * 8 = 80 (left: 80)\n"
    "Numbers: 4 6 9. Target: 30.\n9 - 4 = 5 (left: 5 6)\n5 * 6 = 30 (left: 30)\n"
)
VALUE_QUESTION = "Is the last step correct? Answer:"
STEP = re.compile(r"\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def puzzle_prompt(numbers: tuple[int, ...], target: int) -> str:
    return f"{EXAMPLES}Numbers: {' '.join(map(str, numbers))}. Target: {target}.\n"


def branch_seed(seed: int, level: int, parent_rank: int, branch: int) -> int:
    """One seed per place in the tree, the same in this form and the prompt form."""
    return seed * 10_000 + level * 100 + parent_rank * 10 + branch


def yes_share(yes_logprob: float, no_logprob: float) -> float:
    """A state's value: P(" yes") against P(" no"), in 0..1."""
    return 1.0 / (1.0 + math.exp(no_logprob - yes_logprob))


def solved(lines: list[str], numbers: tuple[int, ...], target: int) -> bool:
    """Whether each step takes two numbers left, computes right, and the last is the target."""
    left = list(numbers)
    for line in lines:
        step = STEP.match(line)
        if step is None or int(step[4]) != OPS[step[2]](int(step[1]), int(step[3])):
            return False
        for used in (int(step[1]), int(step[3])):
            if used not in left:
                return False
            left.remove(used)
        left.append(int(step[4]))
    return left == [target]


@dataclass
class Branch:
    """A state of the tree: its file, its path's thoughts, and the thought it grows."""

    kv: AsyncKV
    lines: list[str]
    num_tokens: int  # the file's tokens where the thought began
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False  # the thought ended its line or reached max_tokens (not pruned)
    value: float = 0.0


async def run(
    lip: AsyncLip,
    numbers: tuple[int, ...] = (3, 4, 5),
    target: int = 35,
    branches: int = 3,
    keep: int = 2,
    max_tokens: int = 20,
    temperature: float = 0.8,
    floor: float = -1.5,
    min_tokens: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Search `len(numbers) - 1` levels (fewer if every branch of one is pruned); returns
    the best path ("output"), its value ("quality"), whether it is right ("solved") and
    the tokens each pruned branch had made ("pruned_tokens")."""
    await lip.mkdir("tree_of_thought", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    names = (f"tree_of_thought/{run_id}-{i}.kv" for i in itertools.count())
    question = await lip.tokenize(VALUE_QUESTION)
    choices = [await lip.tokenize(" yes"), await lip.tokenize(" no")]
    pruned_tokens: list[int] = []

    async def grow(branch: Branch, seed: int, ended: list[int]) -> None:
        with branch.scope:
            sampler = {"temperature": temperature, "seed": seed}
            stream = branch.kv.generate_stream(max_tokens, stop=["\n"], logprobs=1, **sampler)
            async with stream:
                async for piece in stream:
                    branch.logprobs += [entry.logprob for entry in piece.logprobs or ()]
                    count = len(branch.logprobs)  # mean logprob under floor: unlikely
                    unlikely = count >= min_tokens and sum(branch.logprobs) < floor * count
                    if unlikely or (len(ended) >= keep and count > max(ended) + 4):
                        branch.scope.cancel()  # pruned: the generate stops within a step
            branch.done, result = True, stream.result
        if not branch.done:  # pruned: what it had made, then gone
            pruned_tokens.append((await branch.kv.stat())["tokens"] - branch.num_tokens)
            await branch.kv.unlink()
            return
        branch.lines.append(result.text.strip())
        branch.num_tokens = result.tokens
        if result.finish_reason == "stop":
            ended.append(len(result.token_ids))
        if branch.lines[-1]:  # an empty line is no step: value 0
            judge = await branch.kv.fork(next(names))
            await judge.append(question)
            branch.value = yes_share(*await judge.score(choices))
            await judge.unlink()

    try:
        root = await lip.kv(next(names), create=True, exclusive=True)
        num_tokens = await root.append(await lip.tokenize(puzzle_prompt(numbers, target)))
        states = [Branch(root, [], num_tokens)]
        for level in range(len(numbers) - 1):
            children = [
                Branch(await s.kv.fork(next(names)), [*s.lines], s.num_tokens)
                for s in states
                for _ in range(branches)
            ]
            ended: list[int] = []  # token counts of the thoughts that ended their line
            async with trio.open_nursery() as nursery:
                for rank, child in enumerate(children):
                    parent_rank, number = divmod(rank, branches)
                    child_seed = branch_seed(seed, level, parent_rank, number)
                    nursery.start_soon(grow, child, child_seed, ended)
            done = sorted((b for b in children if b.done), key=lambda b: -b.value)  # stable
            if not done:  # every branch pruned: the search ends a level early
                break
            for branch in [*states, *done[keep:]]:
                await branch.kv.unlink()
            states = done[:keep]
        best = states[0]
        return {
            "output": "\n".join(best.lines),
            "quality": best.value,
            "solved": solved(best.lines, numbers, target),
            "pruned_tokens": pruned_tokens,
        }
    finally:  # whatever happened, no file of this run stays
        await remove_run(lip, "tree_of_thought", run_id)


def main() -> None:
    args = [*sys.argv[1:5], *["3 4 5", "35", "3", "2"][len(sys.argv[1:5]) :]]
    numbers = tuple(int(n) for n in args[0].split())
    target, branches, keep = (int(a) for a in args[1:])

    async def search() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, numbers, target, branches, keep)

    started = time.perf_counter()
    result = trio.run(search)
    print(f"numbers {args[0]}, target {target}: {branches} branches a state, keep {keep}")
    print(f"best path (value {result['quality']:.3f}, solved {result['solved']}):")
    print(result["output"])
    pruned, seconds = result["pruned_tokens"], time.perf_counter() - started
    print(f"pruned {len(pruned)} branches mid-thought, after {pruned} tokens; {seconds:.1f} s")


if __name__ == "__main__":
    main()
