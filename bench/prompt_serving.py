"""Doing a program's job by prompt serving, the baseline bench/programs.py measures each
program of the library against.

A prompt-serving client sends whole prompts: every request is a fresh KV file that gets
the whole prompt, one `generate` (or one scoring forward) and is removed. It forks
nothing and keeps nothing between requests, and bench/programs.py runs it on a server
started with `--no-prefix-cache`, so no request reuses another's prompt. Requests may
go at once, as a batching prompt server (vLLM, SGLang) would take them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from symphony.lipctl.aio import AsyncKV, AsyncLip
from symphony.lipctl.results import GenerateResult

FOLDER = "prompt-serving"
_names = itertools.count()


@asynccontextmanager
async def _fresh_file(lip: AsyncLip) -> AsyncIterator[AsyncKV]:
    """One request's file: made empty, removed when the request ends."""
    await lip.mkdir(FOLDER, parents=True)
    kv = await lip.kv(f"{FOLDER}/{os.getpid()}-{next(_names)}.kv", create=True)
    try:
        yield kv
    finally:
        await kv.unlink()


async def generate(lip: AsyncLip, prompt: Sequence[int], **args: Any) -> GenerateResult:
    """One request: the whole `prompt`, then `generate(**args)` on a fresh file."""
    async with _fresh_file(lip) as kv:
        await kv.append(prompt)
        return await kv.generate(**args)


async def logprob(lip: AsyncLip, prompt: Sequence[int], continuation: Sequence[int]) -> float:
    """One request: the summed logprob of `continuation` after `prompt` (both computed,
    on a fresh file), as a prompt server's `echo` + `logprobs` gives it."""
    tokens = [*prompt, *continuation]
    asks = [{"at": i, "logprobs": [tokens[i + 1]]} for i in range(len(prompt) - 1, len(tokens) - 1)]
    async with _fresh_file(lip) as kv:
        result = await kv.forward(tokens, outputs=asks)
    return sum(o.logprobs[0][1] for o in result.outputs if o.logprobs)


async def next_logprobs(lip: AsyncLip, prompt: Sequence[int], ids: Sequence[int]) -> list[float]:
    """One request: the logprobs of each of `ids` as the next token after `prompt`, as a
    prompt server's logprobs for the listed tokens give them."""
    async with _fresh_file(lip) as kv:
        result = await kv.forward(prompt, outputs=[{"at": len(prompt) - 1, "logprobs": list(ids)}])
    given = dict(result.outputs[0].logprobs or [])
    return [given[i] for i in ids]


async def next_top_k(lip: AsyncLip, prompt: Sequence[int], k: int) -> list[tuple[int, float]]:
    """One request: the whole `prompt` on a fresh file, and the k likeliest next tokens
    (a prompt server's max_tokens=0 with top logprobs)."""
    async with _fresh_file(lip) as kv:
        result = await kv.forward(prompt, outputs=[{"at": len(prompt) - 1, "top_k": k}])
    return result.outputs[0].top_k or []
