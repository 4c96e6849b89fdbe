"""Rows of bench/programs.py for the agent programs: Graph of Thoughts (branches merged by
kv_concat), a ReAct agent with tools, and validated output with rollback, each beside the
same job done by prompt serving (whole prompts, fresh files, nothing forked or kept)."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import prompt_serving
import trio
from program_rows import Row, example

from symphony.lipctl.aio import AsyncLip
from symphony.lipctl.results import GenerateResult

graph_of_thought = example("graph_of_thought")
react_agent = example("react_agent")
output_validation = example("output_validation")


# 1. Graph of Thoughts: the branches at once, then the whole merge recomputed ----------

GOT = dict(note_tokens=40, answer_tokens=40)


async def got_prompts(
    lip: AsyncLip, note_tokens: int = 40, answer_tokens: int = 40
) -> dict[str, Any]:
    got = graph_of_thought
    system = {"role": "system", "content": got.SYSTEM}
    asks = [got.branch_message(document) for document in got.DOCUMENTS]
    notes = [""] * len(asks)

    async def branch(i: int) -> None:
        prompt = await lip.apply_chat_template([system, asks[i]])
        result = await prompt_serving.generate(lip, prompt, max_tokens=note_tokens, temperature=0.0)
        notes[i] = result.text.strip()

    async with trio.open_nursery() as nursery:
        for i in range(len(asks)):
            nursery.start_soon(branch, i)
    # the merged context as text: every document and its notes, then the question
    turns = [
        m
        for ask, note in zip(asks, notes, strict=True)
        for m in (ask, {"role": "assistant", "content": note})
    ]
    final = await lip.apply_chat_template(
        [system, *turns, {"role": "user", "content": got.QUESTION}]
    )
    answer = (
        await prompt_serving.generate(lip, final, max_tokens=answer_tokens, temperature=0.0)
    ).text.strip()
    return {"output": answer, "quality": got.quality(answer, got.EXPECT), "notes": notes}


# 2. ReAct: the same loop, every generation a fresh request with the whole transcript ---

REACT_QUESTION = react_agent.QUESTION
REACT_EXPECT = "15"  # 3 + 5 + 7


class Transcript:
    """The agent's context kept by the client as token ids: each generate is one fresh
    request with all of it, its answer appended here (the same pieces the LIP appends,
    so the model sees the same tokens)."""

    def __init__(self, lip: AsyncLip) -> None:
        self.lip = lip
        self.ids: list[int] = []

    async def append(self, ids: Sequence[int]) -> int:
        self.ids += ids
        return len(self.ids)

    async def generate(self, **args: Any) -> GenerateResult:
        result = await prompt_serving.generate(self.lip, self.ids, **args)
        self.ids += result.token_ids
        return result

    async def truncate(self, num_tokens: int) -> None:
        del self.ids[num_tokens:]


def task_folder() -> tempfile.TemporaryDirectory[str]:
    """A fresh folder holding the file the question is about."""
    folder = tempfile.TemporaryDirectory()
    Path(folder.name, react_agent.DEMO_FILE).write_text(react_agent.DEMO_TEXT)
    return folder


async def react_lip(lip: AsyncLip, max_steps: int = 4) -> dict[str, Any]:
    with task_folder() as root:
        return await react_agent.run(lip, REACT_QUESTION, root, max_steps, REACT_EXPECT)


async def react_prompts(lip: AsyncLip, max_steps: int = 4) -> dict[str, Any]:
    with task_folder() as root:
        result = await react_agent.act(Transcript(lip), lip, REACT_QUESTION, root, max_steps)
    return {**result, "quality": float(REACT_EXPECT in result["output"])}


# 3. validated output: on a bad line, the prompt and the good lines sent again --------

VALIDATION = dict(count=12, max_retries=3)


async def validation_prompts(lip: AsyncLip, count: int = 8, max_retries: int = 3) -> dict[str, Any]:
    ov = output_validation
    prompt = await lip.apply_chat_template(ov.messages(count))
    lines: list[str] = []
    attempt = retries = 0
    while len(lines) < count:
        done = await lip.tokenize("".join(f"{line}\n" for line in lines)) if lines else []
        rest = count - len(lines)
        sampler = ov.retry_sampler(len(lines), attempt)
        # greedy: the whole rest of the list in one request; a retry: the one line
        max_tokens = rest * ov.LINE_TOKENS if attempt == 0 else ov.LINE_TOKENS
        sampler.pop("stop", None)
        result = await prompt_serving.generate(lip, prompt + done, max_tokens=max_tokens, **sampler)
        candidates = (result.text.split("\n") + [""] * rest)[: rest if attempt == 0 else 1]
        for candidate in candidates:
            line = candidate.strip()
            if ov.check(line, lines) is None or attempt == max_retries:
                lines.append(line)
                attempt = 0
            else:  # send the prompt and the good lines again, for this line
                attempt += 1
                retries += 1
                break
    valid = sum(ov.check(line, lines[:i]) is None for i, line in enumerate(lines))
    return {"output": "\n".join(lines), "quality": valid / count, "retries": retries}


ROWS: list[Row] = [
    Row(
        program="graph_of_thought",
        uses="fork, generate (branches at once), kv_drop, kv_concat(reposition)",
        lip=functools.partial(graph_of_thought.run, **GOT),
        prompts=functools.partial(got_prompts, **GOT),
        quality="share of the expected words (Nile, 6,650) in the answer",
    ),
    Row(
        program="react_agent",
        uses="generate(stop, grammar=lark), append of observations, truncate rollback",
        lip=react_lip,
        prompts=react_prompts,
        quality="the final answer is right (1) or not (0)",
        same_output=True,
        same_keys=("output", "steps"),
    ),
    Row(
        program="output_validation",
        uses="generate(stop) per line, truncate to the last good line, retry under regex",
        lip=functools.partial(output_validation.run, **VALIDATION),
        prompts=functools.partial(validation_prompts, **VALIDATION),
        quality="share of valid lines (countries of Europe, none twice)",
    ),
]
