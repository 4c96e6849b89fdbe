"""Pick an answer among choices in one step (SGLang's `select`), then sample a word.

SGLang's `select` (Zheng et al. 2023, "SGLang: Efficient Execution of Structured
Language Model Programs", arXiv:2312.07104): the choice whose tokens the model finds
likeliest after the question. `kv.score(choices)` scores every continuation in one
forward that appends nothing: the choices sit side by side after the question, each
seeing the question and itself only (an attention mask), and the result is each one's
mean logprob per token. `kv.sample()` draws the token that would follow, again
appending nothing.

    lipctl run examples/select_choice.py "Which is a fruit?" apple car cloud
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import trio

from symphony.lipctl import SymphonyError
from symphony.lipctl.aio import AsyncLip, connect

QUESTION = "Which of these is a fruit?"
CHOICES = ["an apple", "a car", "a cloud", "a song"]


async def question_ids(lip: AsyncLip, question: str) -> list[int]:
    """The prompt the choices follow: the question, and the start of the answer."""
    chat = await lip.apply_chat_template([{"role": "user", "content": question}])
    return chat + await lip.tokenize("The answer is")


async def choice_ids(lip: AsyncLip, choice: str) -> list[int]:
    return await lip.tokenize(" " + choice)


async def run(
    lip: AsyncLip, question: str = QUESTION, choices: list[str] | None = None
) -> dict[str, Any]:
    """The likeliest of `choices` as the answer to `question`."""
    choices = choices or CHOICES
    await lip.mkdir("select_choice", parents=True)
    path = f"select_choice/{os.getpid()}-{time.time_ns()}.kv"
    try:
        kv = await lip.kv(path, create=True)
        await kv.append(await question_ids(lip, question))
        scores = await kv.score([await choice_ids(lip, c) for c in choices])
        after = await kv.sample(temperature=0.0)
        tokens = int((await kv.stat())["tokens"])  # neither call appended
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    best = max(range(len(choices)), key=scores.__getitem__)
    return {
        "output": choices[best],
        "scores": scores,
        "next_token": await lip.detokenize([after]),
        "tokens": tokens,
    }


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    choices = sys.argv[2:] or CHOICES

    async def session() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, question, choices)

    result = trio.run(session)
    for score, choice in sorted(zip(result["scores"], choices, strict=True), reverse=True):
        print(f"{score:8.3f}  {choice}")
    print(f"chosen: {result['output']}")  # the line tests look for
    print(f"the model's own next token: {result['next_token']!r}")
    print(f"file still {result['tokens']} tokens")


if __name__ == "__main__":
    main()
