"""Many questions under one few-shot prompt: a prefix tree of KV files.

The tree of prompts a batch of few-shot questions makes (the prefix sharing of SGLang's
RadixAttention, Zheng et al. 2023, arXiv:2312.07104, and of Hydragen, Juravsky et al.
2024, arXiv:2402.05099), built by hand: the instruction and the examples every
question shares are prefilled once into a root file; each category forks the root
(`kv.fork`, copy-on-write: no page copied) and appends its own examples; each question
forks its category's file, appends itself and generates a short greedy answer. All
questions run at once, and the model computes each shared prefix once. A later run under
the same instruction and examples (another batch of questions, another LIP of the same
user) computes not even that: the root's whole pages are in the server's prefix cache,
and its prefill attaches them (`root_cached` says how many tokens came from there).

    lipctl run examples/few_shot_tree.py [QUESTIONS_PER_CATEGORY] [MAX_TOKENS]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import trio

from symphony.lipctl.aio import AsyncKV, AsyncLip, connect
from symphony.lipctl.scratch import remove_run

INSTRUCTION = "Answer each question with a single word."
SHARED = [
    ("What color is grass?", "green"),
    ("How many legs does a cat have?", "four"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What animal says moo?", "cow"),
    ("What do you use to see?", "eyes"),
    ("What season comes after winter?", "spring"),
    ("What is the largest ocean?", "Pacific"),
]
# category: a question form, its own examples, its questions (with the right answers)
CATEGORIES = {
    "capitals": (
        "What is the capital of {}?",
        [("Italy", "Rome"), ("Japan", "Tokyo")],
        [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Egypt", "Cairo")],
    ),
    "opposites": (
        "What is the opposite of {}?",
        [("hot", "cold"), ("up", "down")],
        [("big", "small"), ("day", "night"), ("fast", "slow"), ("open", "closed")],
    ),
    "animals": (
        "What is a baby {} called?",
        [("cat", "kitten"), ("cow", "calf")],
        [("dog", "puppy"), ("sheep", "lamb"), ("horse", "foal"), ("duck", "duckling")],
    ),
}


def shots(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"\n\nQ: {question}\nA: {answer}" for question, answer in pairs)


async def tree_tokens(
    lip: AsyncLip, per_category: int
) -> tuple[list[int], dict[str, list[int]], list[tuple[str, list[int], str]]]:
    """The root's tokens, each category's tokens after it, and the questions
    (category, tokens after the category's, expected answer). Each piece begins with
    the blank line before its first question: cut there, the pieces' tokens, joined,
    are the whole prompt's (a byte-level BPE splits before whitespace)."""
    root = await lip.tokenize(INSTRUCTION + shots(SHARED))
    categories, questions = {}, []
    for name, (form, examples, asked) in CATEGORIES.items():
        categories[name] = await lip.tokenize(shots([(form.format(q), a) for q, a in examples]))
        for subject, answer in asked[:per_category]:
            text = f"\n\nQ: {form.format(subject)}\nA:"
            questions.append((name, await lip.tokenize(text), answer))
    return root, categories, questions


def accuracy(answers: list[str], questions: list[tuple[str, list[int], str]]) -> float:
    """The share of answers that begin with the expected word."""
    right = sum(
        a.strip().lower().startswith(expected.lower())
        for a, (_, _, expected) in zip(answers, questions, strict=True)
    )
    return right / len(questions)


async def run(lip: AsyncLip, per_category: int = 4, max_tokens: int = 6) -> dict[str, Any]:
    """Answer `per_category` questions of each category, sharing the few-shot prefixes."""
    root_ids, category_ids, questions = await tree_tokens(lip, per_category)
    await lip.mkdir("few_shot_tree", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    stem = f"few_shot_tree/{run_id}"
    answers = [""] * len(questions)
    shared = [0] * len(questions)
    try:
        root = await lip.kv(f"{stem}-root.kv", create=True)
        root_cached = (await root.forward(root_ids)).cached  # from an earlier run, if any
        categories: dict[str, AsyncKV] = {}
        for name, ids in category_ids.items():
            categories[name] = await root.fork(f"{stem}-{name}.kv")
            await categories[name].append(ids)  # copies the root's last page only if partial
        leaves = []
        for i, (name, _, _) in enumerate(questions):
            leaves.append(await categories[name].fork(f"{stem}-q{i}.kv"))

        async def answer(i: int) -> None:
            await leaves[i].append(questions[i][1])
            result = await leaves[i].generate(max_tokens, stop=["\n"], temperature=0.0)
            answers[i] = result.text
            shared[i] = int((await leaves[i].stat())["shared_pages"])

        async with trio.open_nursery() as nursery:
            for i in range(len(questions)):
                nursery.start_soon(answer, i)
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "few_shot_tree", run_id)
    return {
        "output": answers,
        "quality": accuracy(answers, questions),
        "shared_pages": min(shared),  # pages every question's file shares with others
        "root_cached": root_cached,
        "root_tokens": len(root_ids),
    }


def main() -> None:
    per_category = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 6

    async def session() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, per_category, max_tokens)

    result = trio.run(session)
    asked = [form.format(q) for form, _, qs in CATEGORIES.values() for q, _ in qs[:per_category]]
    for question, answer in zip(asked, result["output"], strict=True):
        print(f"{question} -> {answer.strip()!r}")
    print(f"shared pages per question: {result['shared_pages']}")
    cached, tokens = result["root_cached"], result["root_tokens"]
    print(f"root: {cached} of {tokens} tokens from the prefix cache")
    print(f"accuracy: {result['quality']:.2f}")  # the line tests look for


if __name__ == "__main__":
    main()
