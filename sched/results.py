"""What the syscalls answer, as typed structs: a file's stat, forward, verify and
generate results (the arguments are in schema.py).

The clients check each answer against its struct (`lipctl.client.decode`); fields a newer
server adds are ignored. Imports no torch: raw logits become floats with `array`.
"""

from __future__ import annotations

import array
import sys
from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "cancelled", "error"]


def logit_values(raw: bytes) -> array.array[float]:
    """Raw logits (float32 little-endian bytes, one per vocabulary id) as an array of
    floats, indexable by token id; `list(...)` of it is a plain list. Needs no torch.

    Raises:
        ValueError: `raw` is not a whole number of float32 values.
    """
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes are not float32 values")
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


class Stat(msgspec.Struct, frozen=True):
    """A KV file as kv_stat (and kv_open, kv_fork, kv_truncate) answer."""

    tokens: int
    next_position: int  # where a token appended without a position goes
    pages: int
    shared_pages: int  # pages another file (or work in flight) also references
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime_ns: int
    origin: str  # "computed", or "imported by uid N"
    grammar: dict[str, Any] | None = None  # what its next tokens must match (kv_constrain)


class Output(msgspec.Struct, frozen=True):
    """What one forward output asked for, after new token `at` (-1: after the file's
    last token before the call). Fields not asked for are None."""

    at: int
    token: int | None = None  # the sampled token
    logprob: float | None = None  # of the sampled token
    logprobs: list[tuple[int, float]] | None = None  # (id, logprob) of the asked ids, in order
    top_k: list[tuple[int, float]] | None = None  # (id, logprob), best first
    entropy: float | None = None
    logits: bytes | None = None  # float32 little-endian: see `logit_values()`

    def logit_values(self) -> array.array[float]:
        """The raw logits as floats (see `logit_values`).

        Raises:
            ValueError: the output did not ask for logits.
        """
        if self.logits is None:
            raise ValueError('this output has no logits: ask outputs=[{"logits": True}]')
        return logit_values(self.logits)


class ForwardResult(msgspec.Struct, frozen=True):
    """A forward's answer: the file's length after it, how many new tokens the prefix
    index served, the outputs asked for, and the last sampled token (None: none)."""

    tokens: int
    cached: int
    outputs: list[Output]
    token: int | None = None


class VerifyResult(msgspec.Struct, frozen=True):
    """A verify's answer: `accepted` draft tokens were kept; `token` (the correction or
    bonus token) is not appended: pass it as the next call's `tokens`."""

    tokens: int
    accepted: int
    token: int
    token_ids: list[int]  # draft[:accepted] + [token]
    # asked with ahead=True: the likeliest token after each of draft[accepted:], the
    # rejected one first (the next call's guesses, as Jacobi decoding takes them); with
    # a grammar, only as far as it allows the draft
    ahead: list[int] = []


class Usage(msgspec.Struct, frozen=True):
    """Token counts of one generate."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class TokenLogprob(msgspec.Struct, frozen=True):
    """A generated token's logprob and the `logprobs` likeliest alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class Piece(msgspec.Struct, frozen=True):
    """One streamed piece of a generate: its text (never a split UTF-8 character) and
    the tokens generated since the previous piece. str() of it is the text."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # the tokens' entries, when asked

    def __str__(self) -> str:
        return self.text


class GenerateResult(msgspec.Struct, frozen=True):
    """A generate's answer; str() of it is the generated text."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    tokens: int  # the file's length after
    usage: Usage
    logprobs: list[TokenLogprob] | None = None  # when asked with logprobs=k
    error: str | None = None  # why, when finish_reason is "error"

    def __str__(self) -> str:
        return self.text
