"""Graph of Thoughts: branches take notes on one document each, then merge into one context.

Graph of Thoughts (Besta et al. 2023, arXiv:2308.09687) lets thoughts branch and then
aggregates them. Here each branch is a KV file, forked from a shared header (the system
prompt, prefilled once): document + instruction + the notes it generates, all branches
at once. `lip.kv_concat` then merges the branches into one context with `reposition`:
the first branch lands unmoved and shares its whole pages, the others are copied there
with their keys re-rotated to their new positions. A final question is appended and
answered from the merged context, so no document or note is prefilled twice. Merging is
an approximation: each branch's keys never attended to the other branches.

Calls: apply_chat_template, tokenize, kv.append, kv.fork, kv.generate, kv.drop,
lip.kv_concat, kv.stat; listdir and kv_unlink to remove the run's files.

    lipctl run examples/graph_of_thought.py ["QUESTION"]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from symphony.lipctl.aio import AsyncKV, AsyncLip, connect
from symphony.lipctl.scratch import remove_run

SYSTEM = "You are a careful assistant. You answer briefly, using only the given documents."
DOCUMENTS = (
    "The Danube flows 2,850 km from the Black Forest in Germany to the Black Sea.",
    "The Nile, about 6,650 km long, flows north through eleven countries to the sea.",
    "The Rhine runs 1,230 km from the Swiss Alps to the North Sea at Rotterdam.",
)
INSTRUCTION = "Write down the river and its length in km."
QUESTION = "Using the notes above, which river is the longest, and how long is it?"
EXPECT = ("Nile", "6,650")  # what a right answer names


def branch_message(document: str) -> dict[str, str]:
    return {"role": "user", "content": f"Document: {document}\n{INSTRUCTION}"}


def quality(answer: str, expect: Sequence[str]) -> float:
    """The share of the expected words the answer holds."""
    return sum(word in answer for word in expect) / len(expect) if expect else 0.0


async def take_notes(lip: AsyncLip, kv: AsyncKV, turn: list[int], max_tokens: int) -> str:
    """Generate one branch's notes after `turn` and close the assistant's turn (ChatML)."""
    await kv.append(turn)
    notes = await kv.generate(max_tokens=max_tokens, temperature=0.0)
    end = await lip.tokenize("<|im_end|>")
    ended = notes.token_ids[-1:] == end  # the end of turn is in the file: add its newline
    await kv.append(await lip.tokenize("\n" if ended else "<|im_end|>\n"))
    return notes.text.strip()


async def run(
    lip: AsyncLip,
    documents: Sequence[str] = DOCUMENTS,
    question: str = QUESTION,
    note_tokens: int = 32,
    answer_tokens: int = 32,
    expect: Sequence[str] = EXPECT,
) -> dict[str, Any]:
    """Notes on each document in parallel branches, merged; the answer from the merge."""
    await lip.mkdir("graph_of_thought", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    base = f"graph_of_thought/{run_id}"
    system = {"role": "system", "content": SYSTEM}
    header_ids = await lip.apply_chat_template([system], add_generation_prompt=False)
    try:
        header = await lip.kv(f"{base}-header.kv", create=True)
        await header.append(header_ids)
        branches: list[AsyncKV] = []
        for i in range(len(documents)):  # copy-on-write: they share the header's pages
            branches.append(await header.fork(f"{base}-branch{i}.kv"))
        notes = [""] * len(documents)

        async def branch(i: int) -> None:
            turn = await lip.apply_chat_template([system, branch_message(documents[i])])
            notes[i] = await take_notes(lip, branches[i], turn[len(header_ids) :], note_tokens)

        async with trio.open_nursery() as nursery:  # the branches decode in the same steps
            for i in range(len(documents)):
                nursery.start_soon(branch, i)
        for later in branches[1:]:  # the header once: the first branch brings it
            await later.drop(0, len(header_ids))
        pieces = [(await b.stat())["tokens"] for b in branches]
        merged = await lip.kv_concat(f"{base}-merged.kv", [b.path for b in branches])
        stat = await merged.stat()
        final = await lip.apply_chat_template([system, {"role": "user", "content": question}])
        await merged.append(final[len(header_ids) :])
        answer = (await merged.generate(max_tokens=answer_tokens, temperature=0.0)).text.strip()
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "graph_of_thought", run_id)
    return {
        "output": answer,
        "quality": quality(answer, expect),
        "notes": notes,
        "piece_tokens": pieces,
        "merged_tokens": stat["tokens"],
        "shared_pages": stat["shared_pages"],
    }


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION

    async def go() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, question=question)

    started = time.perf_counter()
    result = trio.run(go)
    for i, note in enumerate(result["notes"]):
        print(f"notes {i}: {' '.join(note.split())}")
    print(
        f"merged: {result['merged_tokens']} tokens from {len(result['notes'])} branches "
        f"({result['shared_pages']} pages shared)"
    )
    print(f"answer: {result['output']}  ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
