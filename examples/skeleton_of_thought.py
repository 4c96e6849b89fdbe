"""Skeleton-of-Thought: outline an answer in a few short points, then write every point
at once, each on a fork of the question and its outline, and join them.

Follows Ning et al. 2023, "Skeleton-of-Thought: Prompting LLMs for Efficient Parallel
Generation" (arXiv:2307.15337). The question (with an optional text to answer from) is
prefilled once; the skeleton comes from one greedy `kv.generate` under a regex grammar
(3 to 5 numbered points of a few words); then the question + skeleton file is forked once
per point (`kv.fork`, copy-on-write: the forks share its pages) and every point is
expanded at once, greedily, in a user turn of its own. Greedy throughout: a prompt
server given the same token sequences writes the same answer.

    lipctl run examples/skeleton_of_thought.py ["QUESTION"] [POINT_TOKENS]

It prints the answer, then `joined N points`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.scratch import remove_run

QUESTION = "How can I improve my sleep?"
SKELETON_ASK = (
    "You're an organizer responsible for only giving the skeleton (not the full content) "
    "for answering the question. Provide the skeleton in a list of points (numbered 1., "
    "2., 3., etc.) to answer the question. Instead of writing a full sentence, each "
    "skeleton point should be very short with only 3~5 words. Generally, the skeleton "
    "should have 3~5 points."
)
WORDS = r"[A-Za-z][A-Za-z,'-]{0,14}(?: [A-Za-z,'-]{1,15}){1,6}"  # a point: 2 to 7 words
SKELETON = rf"1\. {WORDS}\n2\. {WORDS}\n3\. {WORDS}\n(4\. {WORDS}\n(5\. {WORDS}\n)?)?"


async def skeleton_prompt(lip: AsyncLip, question: str, context: str = "") -> list[int]:
    """The chat prompt asking for the skeleton, after `context` (a text to answer from)."""
    ask = f"{SKELETON_ASK}\n\nQuestion: {question}"
    content = f"{context}\n\n{ask}" if context else ask
    return await lip.apply_chat_template([{"role": "user", "content": content}])


def points_of(skeleton: str) -> list[str]:
    """The points of a skeleton the grammar made: "1. a\\n2. b\\n..." -> ["a", "b"]."""
    return [line.partition(". ")[2] for line in skeleton.split("\n") if line]


async def point_turn(lip: AsyncLip, point: str) -> list[int]:
    """What follows the skeleton in one point's fork: the skeleton's turn ends, and a
    user turn asks for that point alone. Written out in ChatML (the template would add
    its system prompt again)."""
    ask = f'Explain "{point}" in one or two sentences.'
    return await lip.tokenize(
        f"<|im_end|>\n<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n"
    )


def join(points: list[str], expansions: list[str]) -> str:
    return "\n".join(
        f"{i}. {point}: {text.strip()}"
        for i, (point, text) in enumerate(zip(points, expansions, strict=True), 1)
    )


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    context: str = "",
    point_tokens: int = 32,
    skeleton_tokens: int = 100,
) -> dict[str, Any]:
    """The joined answer ("output"), its "skeleton" and "points", and the pages each
    point's fork shared with the question and skeleton ("shared_pages")."""
    await lip.mkdir("skeleton_of_thought", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    name = f"skeleton_of_thought/{run_id}"
    forks = []
    try:
        question_kv = await lip.kv(f"{name}-question.kv", create=True, exclusive=True)
        await question_kv.append(await skeleton_prompt(lip, question, context))
        skeleton = await question_kv.generate(
            skeleton_tokens, temperature=0.0, grammar={"regex": SKELETON}
        )
        points = points_of(skeleton.text)
        for i in range(len(points)):
            forks.append(await question_kv.fork(f"{name}-{i + 1}.kv"))
        expansions = [""] * len(points)

        async def expand(i: int) -> None:
            await forks[i].append(await point_turn(lip, points[i]))
            result = await forks[i].generate(point_tokens, stop=["\n"], temperature=0.0)
            expansions[i] = result.text

        async with trio.open_nursery() as nursery:
            for i in range(len(points)):
                nursery.start_soon(expand, i)
        shared = min([(await kv.stat())["shared_pages"] for kv in forks], default=0)
        answer = join(points, expansions)
        return {
            "output": answer,
            "skeleton": skeleton.text,
            "points": points,
            "shared_pages": shared,
        }
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "skeleton_of_thought", run_id)


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    point_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32

    async def answer() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, question, point_tokens=point_tokens)

    started = time.perf_counter()
    result = trio.run(answer)
    print(f"Q: {question}\nskeleton:\n{result['skeleton']}answer:\n{result['output']}")
    points, pages, seconds = (
        len(result["points"]),
        result["shared_pages"],
        time.perf_counter() - started,
    )
    print(f"joined {points} points, each fork sharing {pages} pages; {seconds:.1f} s")


if __name__ == "__main__":
    main()
