"""Making a request's choices: one prefilled KV file, forked once per choice.

The prompt is computed once (the prefix cache supplies what an earlier request with the
same beginning computed, and `cached` says how much); each of the `n` choices generates
on a copy-on-write fork of it, all at once, and the files go when the request ends,
answered, failed or cancelled by a client that went away.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.lipctl.aio import AsyncKV, AsyncLip
from symphony.lipctl.openai_api.request_files import request_base
from symphony.lipctl.results import ForwardResult, GenerateResult, Piece, TokenLogprob, Usage
from symphony.lipctl.wire import SymphonyError

MAX_GENERATE = 8192  # tokens one generate makes at most (the syscall's bound)
NEG_INF_LOGPROB = -9999.0  # what OpenAI's API writes for a token of probability 0

OnPiece = Callable[[int, Piece], Awaitable[None]]
OnReady = Callable[[], Awaitable[None]]


@dataclass
class Job:
    """What to generate: after `prompt`, `n` choices of at most `max_tokens` tokens."""

    prompt: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; else this many alternatives a token
    grammar: dict[str, Any] | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: int | None = None  # the prompt's tokens' logprobs, with k alternatives

    def sampler(self, choice: int) -> dict[str, Any]:
        """Choice i draws from stream seed + i: the choices differ, and the same seed
        gives the same choices again."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        fields = {"temperature": self.temperature, "top_p": self.top_p, "seed": seed}
        return {**fields, "logit_bias": self.logit_bias} if self.logit_bias else fields


@dataclass
class Made:
    """The choices (in order) and how much of the prompt the prefix cache supplied."""

    results: list[GenerateResult]
    prompt_tokens: int
    cached_tokens: int
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens 1..

    def usage(self) -> dict[str, Any]:
        completion = sum(len(r.token_ids) for r in self.results)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


async def make_choices(
    lip: AsyncLip,
    folder: str,
    job: Job,
    on_piece: OnPiece | None = None,
    on_ready: OnReady | None = None,
) -> Made:
    """Prefill once, fork per choice, generate them all at once; `on_ready()` once the
    pages are there (a stream's headers go then, after an out-of-pages could still be a
    429), `on_piece(i, piece)` streams choice i as it comes. The request's files (in
    `folder`) are gone when this returns.

    Raises:
        SymphonyError: a syscall failed (the files are gone all the same).
    """
    base = request_base(folder)
    # every name the request may make, known before any is: a cancel while a create or
    # fork is in flight (made on the server, not yet answered) leaves no file behind
    names = [f"{base}.kv", *(f"{base}-{i}.kv" for i in range(1, job.n))]
    files: list[AsyncKV] = []
    try:
        first = await lip.kv(names[0], create=True, exclusive=True)
        files.append(first)
        prefill = await first.forward(job.prompt, outputs=_prompt_asks(job))
        for name in names[1:]:
            files.append(await first.fork(name))
        if on_ready is not None:
            await on_ready()
        results: list[GenerateResult | None] = [None] * job.n
        failed: list[SymphonyError] = []

        async def one(i: int, cancel: trio.CancelScope) -> None:
            try:
                if not job.max_tokens:  # the prompt alone was asked about
                    results[i] = _nothing(files[i], prefill, len(job.prompt))
                    return
                results[i] = await _generate(files[i], i, job, on_piece)
            except SymphonyError as exc:  # one choice failing ends the request
                failed.append(exc)
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for i in range(job.n):
                nursery.start_soon(one, i, nursery.cancel_scope)
        if failed:
            raise failed[0]
        done = [r for r in results if r is not None]
        assert len(done) == job.n
        made = Made(done, len(job.prompt), prefill.cached)
        made.prompt_logprobs = _prompt_logprobs(job.prompt, prefill)
        return made
    finally:
        with trio.CancelScope(shield=True):  # a client gone still frees its pages
            for name in names:
                with contextlib.suppress(SymphonyError):  # ENOENT: never made
                    await lip.call("kv_unlink", path=name)


def _prompt_asks(job: Job) -> list[dict[str, Any]] | None:
    """The prefill's outputs: each prompt token's logprob after the ones before it."""
    if job.prompt_logprobs is None:
        return None
    k = job.prompt_logprobs
    return [
        {"at": i, "logprobs": [job.prompt[i + 1]], **({"top_k": k} if k else {})}
        for i in range(len(job.prompt) - 1)
    ]


def _prompt_logprobs(prompt: list[int], prefill: ForwardResult) -> list[TokenLogprob]:
    return [
        TokenLogprob(prompt[o.at + 1], (o.logprobs or [(0, 0.0)])[0][1], list(o.top_k or []))
        for o in sorted(prefill.outputs, key=lambda o: o.at)
    ]


def _nothing(kv: AsyncKV, prefill: ForwardResult, prompt_tokens: int) -> GenerateResult:
    usage = Usage(prompt_tokens, prefill.cached, 0)
    return GenerateResult("", [], "length", prefill.tokens, usage, logprobs=[])


async def _generate(kv: AsyncKV, i: int, job: Job, on_piece: OnPiece | None) -> GenerateResult:
    # the token's own logprob comes with one alternative at least; trimmed to the ask
    alternatives = 0 if job.logprobs is None else max(1, job.logprobs)
    args: dict[str, Any] = {
        "max_tokens": job.max_tokens,
        "stop": job.stop,
        "logprobs": alternatives,
        "grammar": job.grammar,
        **job.sampler(i),
    }
    if on_piece is None:
        return await kv.generate(**args)
    async with kv.generate_stream(**args) as stream:
        async for piece in stream:
            await on_piece(i, piece)
    return stream.result


def finish_reason(result: GenerateResult) -> str:
    """OpenAI's: stop or length (an error of the server's is raised, not answered)."""
    if result.finish_reason == "error":
        raise SymphonyError("EAGAIN", result.error or "the server stopped this generation")
    return "length" if result.finish_reason == "length" else "stop"


def finite(logprob: float) -> float:
    """A logprob JSON can hold: -inf (probability 0) as OpenAI writes it."""
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB


class TokenTexts:
    """Each token id's text, asked of the server once per request."""

    def __init__(self, lip: AsyncLip) -> None:
        self.lip = lip
        self._texts: dict[int, str] = {}

    async def fill(self, logprobs: list[TokenLogprob], k: int) -> None:
        wanted = {e.token for e in logprobs} | {t for e in logprobs for t, _ in e.top[:k]}
        for token in wanted - set(self._texts):
            self._texts[token] = await self.lip.detokenize([token])

    def __getitem__(self, token: int) -> str:
        return self._texts[token]

    async def content(self, logprobs: list[TokenLogprob], k: int) -> list[dict[str, Any]]:
        """Chat's `logprobs.content`: each token with its `k` likeliest alternatives."""
        await self.fill(logprobs, k)

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._texts[token]
            return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

        return [
            {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top[:k]]}
            for e in logprobs
        ]
