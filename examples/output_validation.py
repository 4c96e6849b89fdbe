"""Generate, validate, roll back to the last good line and retry: a list checked item by item.

Guardrails-style validation and self-repair: the model writes a list one line at a time,
and each line is checked by a Python predicate (here: a country of Europe that the list
does not hold yet; "not yet listed" is what no grammar states). A line that fails is
rolled back with `kv.truncate` to the end of the last good line, nothing before it
recomputed, and generated again with another seed, under a regex grammar that at least
fixes its shape ("N. Name", a newline), up to `max_retries` times; then the last try stays.
"quality" is the share of valid lines in the final list.

Calls: apply_chat_template, tokenize, detokenize, kv.append, kv.generate(stop=, grammar=,
seed=), kv.truncate, kv.unlink.

    lipctl run examples/output_validation.py [COUNT]
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from symphony.lipctl import SymphonyError
from symphony.lipctl.aio import AsyncLip, connect

LINE_TOKENS = 8
COUNTRIES = (
    "Albania,Andorra,Austria,Belarus,Belgium,Bosnia,Bulgaria,Croatia,Cyprus,Czechia,Denmark,"
    "Estonia,Finland,France,Germany,Greece,Hungary,Iceland,Ireland,Italy,Kosovo,Latvia,"
    "Liechtenstein,Lithuania,Luxembourg,Malta,Moldova,Monaco,Montenegro,Netherlands,Norway,"
    "Poland,Portugal,Romania,Russia,Serbia,Slovakia,Slovenia,Spain,Sweden,Switzerland,Turkey,"
    "Ukraine,North Macedonia,San Marino,United Kingdom,Vatican City,Czech Republic"
)
EUROPE = frozenset(COUNTRIES.split(","))


def messages(count: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You answer with a list: one item a line, nothing else."},
        {"role": "user", "content": f"List {count} different countries of Europe, one per line."},
    ]


def name_of(line: str) -> str:
    return re.sub(r"^[0-9]+[.)]\s*", "", line).strip()  # "3. Spain" and "Spain" alike


def check(line: str, earlier: Sequence[str]) -> str | None:
    """Why `line` is not a country of Europe the list does not hold yet; None when it is."""
    name = name_of(line)
    if name not in EUROPE:
        return "not a country of Europe"
    return "already listed" if name in {name_of(e) for e in earlier} else None


def retry_sampler(line: int, attempt: int) -> dict[str, Any]:
    """The first try of a line is greedy; a retry samples, seeded by line and attempt,
    under a grammar of the line's shape ("N. Name"): what it cannot say (a country, not
    listed yet) is `check`'s."""
    if attempt == 0:
        return {"temperature": 0.0, "stop": ["\n"]}
    shape = f"{line + 1}\\. [A-Z][a-z]+( [A-Z][a-z]+)?\n"
    return {"temperature": 0.8, "seed": 100 * line + attempt, "grammar": {"regex": shape}}


async def run(lip: AsyncLip, count: int = 8, max_retries: int = 3) -> dict[str, Any]:
    """A list of `count` countries of Europe, each line checked as it ends."""
    await lip.mkdir("output_validation", parents=True)
    path = f"output_validation/{os.getpid()}-{time.time_ns()}.kv"
    lines: list[str] = []
    line_ids: list[list[int]] = []  # each kept line's tokens, as the file holds them
    retries = 0
    try:
        kv = await lip.kv(path, create=True)
        good_end = await kv.append(await lip.apply_chat_template(messages(count)))
        prompt_tokens = good_end
        while len(lines) < count:
            for attempt in range(max_retries + 1):
                sampler = retry_sampler(len(lines), attempt)
                result = await kv.generate(max_tokens=LINE_TOKENS, **sampler)
                text = await lip.detokenize(result.token_ids)
                line = text.split("\n")[0].strip()
                if check(line, lines) is None or attempt == max_retries:
                    break  # good, or the last try, which stays
                await kv.truncate(good_end)  # back to the end of the last good line
                retries += 1
            ids = result.token_ids
            if text != line + "\n":  # no newline, or more than the line: write it cleanly
                await kv.truncate(good_end)
                ids = await lip.tokenize(line + "\n")
                await kv.append(ids)
            good_end += len(ids)
            lines.append(line)
            line_ids.append(ids)
        file_tokens = (await kv.stat())["tokens"]
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    valid = sum(check(line, lines[:i]) is None for i, line in enumerate(lines))
    return {
        "output": "\n".join(lines),
        "quality": valid / count,
        "retries": retries,
        "prompt_tokens": prompt_tokens,
        "line_ids": line_ids,
        "file_tokens": file_tokens,
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 8

    async def go() -> dict[str, Any]:
        async with connect() as lip:
            return await run(lip, count)

    result = trio.run(go)
    print(result["output"])
    print(f"valid: {result['quality']:.2f} of {count} lines, {result['retries']} retries")


if __name__ == "__main__":
    main()
