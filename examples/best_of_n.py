"""Best-of-n: sample n answers, rerank them by likelihood under a judging prompt.

Best-of-n sampling with a reranker (as in Stiennon et al. 2020, "Learning to summarize
from human feedback", arXiv:2009.01325, with the model itself as the judge instead of a
reward model), picking like SGLang's `select` (Zheng et al. 2023, arXiv:2312.07104).
The question is prefilled once; n copy-on-write forks of it sample at once, each with
its own seed (`kv.generate(temperature, seed)`). A second file holds a judging prompt,
the question under a strict grader's instruction, and `kv.score` rates every answer in
one forward that appends nothing: each answer's mean logprob per token there. The best
is returned.

    lipctl run examples/best_of_n.py [QUESTION] [N] [MAX_TOKENS]
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.results import GenerateResult
from symphony.lipctl.scratch import remove_run

QUESTION = "Why is the sky blue? Answer in one sentence."
JUDGE = "You are a strict grader. Only a correct, clear and concise answer is likely here."
SEED = 0xB357  # the first sample's seed; sample i draws from stream SEED + i


async def prompts(lip: AsyncLip, question: str) -> tuple[list[int], list[int]]:
    """The token ids of the sampling prompt and of the judging prompt."""
    user = {"role": "user", "content": question}
    judge = [{"role": "system", "content": JUDGE}, user]
    return await lip.apply_chat_template([user]), await lip.apply_chat_template(judge)


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    n: int = 4,
    max_tokens: int = 32,
    temperature: float = 0.8,
    seed: int = SEED,
) -> dict[str, Any]:
    """The likeliest under the judge of `n` sampled answers to `question`."""
    prompt_ids, judge_ids = await prompts(lip, question)
    await lip.mkdir("best_of_n", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    stem = f"best_of_n/{run_id}"
    samples: list[GenerateResult | None] = [None] * n
    try:
        prompt = await lip.kv(f"{stem}-prompt.kv", create=True)
        judge = await lip.kv(f"{stem}-judge.kv", create=True)
        await prompt.append(prompt_ids)
        forks = [await prompt.fork(f"{stem}-{i}.kv") for i in range(n)]

        async def draw(i: int) -> None:
            sample = await forks[i].generate(max_tokens, temperature=temperature, seed=seed + i)
            samples[i] = sample

        async with trio.open_nursery() as nursery:  # the judge prefills meanwhile
            nursery.start_soon(judge.append, judge_ids)
            for i in range(n):
                nursery.start_soon(draw, i)
        drawn = [s for s in samples if s is not None]
        # each answer as generated, its end of turn too (max_tokens >= 1: never empty)
        scores = await judge.score([s.token_ids for s in drawn])
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "best_of_n", run_id)
    best = max(range(n), key=scores.__getitem__)
    return {
        "output": drawn[best].text,
        "samples": [s.text for s in drawn],
        "scores": scores,
        "quality": scores[best],
    }


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 24

    async def session() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, question, n, max_tokens)

    result = trio.run(session)
    for score, text in sorted(zip(result["scores"], result["samples"], strict=True)):
        print(f"{score:8.3f}  {text.strip()!r}")
    print(f"best of {n}: {result['output'].strip()!r}")  # the line tests look for


if __name__ == "__main__":
    main()
