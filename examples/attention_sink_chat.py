"""A chat that runs forever in bounded memory: StreamingLLM's attention sinks.

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"
(arXiv:2309.17453). The file keeps its first tokens (the system prompt: the "sinks"
attention leans on) and the most recent ones. When it grows past its budget, the oldest
turns after the sinks go (`kv.drop(start, end, reposition=True)`): their pages return
to the pool, and the tail's cached keys are re-rotated so positions stay contiguous, so
the context never runs out. Each turn appends the user's message and `kv.generate`s.

    lipctl run examples/attention_sink_chat.py [TURNS] [BUDGET] [MAX_TOKENS]
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

QUESTIONS = [
    "Name a planet.",
    "Say something about rivers.",
    "What is two plus two?",
    "Give me a word that rhymes with cat.",
    "Describe the sea in five words.",
]
SYSTEM = {"role": "system", "content": "You are a brief assistant. Answer in a sentence."}


async def turn_ids(lip: AsyncLip, turn: int) -> tuple[list[int], list[int]]:
    """The sinks (the system turn) and turn `turn`'s user message after them."""
    sink_ids = await lip.apply_chat_template([SYSTEM], add_generation_prompt=False)
    user = {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}
    # this turn's tokens: the conversation's rendering past the system turn
    ids = await lip.apply_chat_template([SYSTEM, user])
    return sink_ids, ids[len(sink_ids) :]


def overflow(num_tokens: int, num_sinks: int, budget: int) -> tuple[int, int]:
    """The token range to drop: past the budget, keep the sinks and the newest half."""
    if num_tokens <= budget:
        return num_sinks, num_sinks
    return num_sinks, num_sinks + num_tokens - budget // 2


async def run(
    lip: AsyncLip, turns: int = 12, budget: int = 400, max_tokens: int = 24
) -> dict[str, Any]:
    """Chat for `turns` turns in a file kept under `budget` tokens (plus one turn)."""
    await lip.mkdir("attention_sink_chat", parents=True)
    path = f"attention_sink_chat/{os.getpid()}-{time.time_ns()}.kv"
    newline = await lip.tokenize("\n")  # the template's newline after the end of a turn
    answers, rows, most_pages = [], [], 0
    try:
        kv = await lip.kv(path, create=True)
        for turn in range(turns):
            sink_ids, user_ids = await turn_ids(lip, turn)
            if turn == 0:
                await kv.append(sink_ids)
            await kv.append(user_ids)
            answer = await kv.generate(max_tokens=max_tokens, temperature=0.0)
            await kv.append(newline)
            start, end = overflow(int((await kv.stat())["tokens"]), len(sink_ids), budget)
            if end > start:
                await kv.drop(start, end, reposition=True)
            stat = await kv.stat()
            most_pages = max(most_pages, int(stat["pages"]))
            answers.append(answer.text)
            rows.append(
                f"[tokens {stat['tokens']}, next position {stat['next_position']}, "
                f"pages {stat['pages']}]"
            )
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    page_size = int(lip.info["model"]["page_size"])
    return {
        "output": answers,
        "stats": rows,
        "bounded": most_pages <= -(-budget // page_size) + 1,
        "most_pages": most_pages,
    }


def main() -> None:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 24

    async def session() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, turns, budget, max_tokens)

    result = trio.run(session)
    for i, (answer, stat) in enumerate(zip(result["output"], result["stats"], strict=True)):
        question = QUESTIONS[i % len(QUESTIONS)]
        print(f"turn {i + 1}: {question!r} -> {answer.strip()[:60]!r} {stat}")
    print(f"bounded: {result['bounded']}")  # the line tests look for


if __name__ == "__main__":
    main()
