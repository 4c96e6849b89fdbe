"""Self-consistency: sample several chains of thought for a word problem, take the
majority answer.

Follows Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning in
Language Models" (arXiv:2203.11171), with the few-shot chain-of-thought exemplars of Wei
et al. 2022 (arXiv:2201.11903). The exemplars and the question are prefilled once into
one KV file (`kv.append`); each chain is a copy-on-write fork of it (`kv.fork`, no page
copied) that samples its reasoning with its own seed (`kv.generate`, temperature 0.7,
seed=i), all at once; the last number of each chain is its answer, and the most frequent
answer wins. Seeded, so a run makes the same chains again, and so does a prompt server
given the same tokens and seeds.

    lipctl run examples/self_consistency.py [CHAINS] ["QUESTION" [ANSWER]]

It prints `majority answer: A (V of N votes)`, and `right: True/False` given an ANSWER.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.scratch import remove_run

EXEMPLARS = [  # Wei et al. 2022's GSM8K chain-of-thought exemplars (the first six)
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers "
        "plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were "
        "planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are "
        "in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do "
        "they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had "
        "32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he "
        "gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How "
        "many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that "
        "is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So "
        "she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
]
QUESTION = "Tom has 3 bags with 5 apples in each bag. How many apples does he have?"
ANSWER = "15"
STOP = ["\n\n", "\nQ:"]  # a chain ends where the next exemplar would begin
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def few_shot_prompt(question: str, shots: int = len(EXEMPLARS)) -> str:
    lines = [f"Q: {q}\nA: {a}\n\n" for q, a in EXEMPLARS[:shots]]
    return "".join(lines) + f"Q: {question}\nA:"


def final_number(chain: str) -> str | None:
    """The chain's answer: the number after "The answer is", else its last number."""
    said = chain.rpartition("answer is")[2] or chain
    numbers = NUMBER.findall(said) or NUMBER.findall(chain)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def vote(chains: list[str], answer: str | None) -> dict[str, Any]:
    """The majority answer ("output"; ties go to the first chain's), its votes, and
    "quality": 1.0 if it is the known `answer`, else 0.0 (without one: its vote share)."""
    answers = [final_number(chain) for chain in chains]
    votes = Counter(a for a in answers if a is not None)
    winner, count = votes.most_common(1)[0] if votes else (None, 0)
    quality = float(winner == answer) if answer is not None else count / len(chains)
    return {"output": winner, "votes": count, "answers": answers, "quality": quality}


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    answer: str | None = ANSWER,
    chains: int = 8,
    shots: int = len(EXEMPLARS),
    max_tokens: int = 64,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """Sample `chains` chains (seeds 0..chains-1) on forks of one prefilled prompt and
    vote; also returns the "chains" and the pages each fork shared ("shared_pages")."""
    await lip.mkdir("self_consistency", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    name = f"self_consistency/{run_id}"
    forks = []
    try:
        prompt = await lip.kv(f"{name}-prompt.kv", create=True, exclusive=True)
        await prompt.append(await lip.tokenize(few_shot_prompt(question, shots)))
        for i in range(chains):
            forks.append(await prompt.fork(f"{name}-{i}.kv"))
        results: list[Any] = [None] * chains

        async def sample(i: int) -> None:
            sampler = {"temperature": temperature, "seed": i}
            results[i] = await forks[i].generate(max_tokens, stop=STOP, **sampler)

        async with trio.open_nursery() as nursery:
            for i in range(chains):
                nursery.start_soon(sample, i)
        texts = [r.text for r in results]
        shared = min([(await kv.stat())["shared_pages"] for kv in forks], default=0)
        return {**vote(texts, answer), "chains": texts, "shared_pages": shared}
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "self_consistency", run_id)


def main() -> None:
    chains = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    question = sys.argv[2] if len(sys.argv) > 2 else QUESTION
    answer = sys.argv[3] if len(sys.argv) > 3 else (ANSWER if len(sys.argv) <= 2 else None)

    async def ask() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, question, answer, chains)

    started = time.perf_counter()
    result = trio.run(ask)
    for i, chain in enumerate(result["chains"]):
        print(f"chain {i} -> {result['answers'][i]}: {chain.strip()!r}")
    print(f"majority answer: {result['output']} ({result['votes']} of {chains} votes)")
    known = f"right: {result['output'] == answer} (the answer is {answer}); " if answer else ""
    seconds = time.perf_counter() - started
    print(f"{known}each fork shared {result['shared_pages']} pages of the prompt; {seconds:.1f} s")


if __name__ == "__main__":
    main()
