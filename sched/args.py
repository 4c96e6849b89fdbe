"""Checking syscall arguments: every bad argument is EINVAL with a sentence.

`parse` checks a call's arguments against its struct (schema.py) and gives msgspec's
own account of what is wrong, with the field's path; what the struct cannot know (the
vocabulary, the store) the handlers check after.
"""

from __future__ import annotations

import errno
from typing import Any, TypeVar

import msgspec

from symphony.engine.sampling import SamplingParams
from symphony.fs.errors import StoreError
from symphony.sched import schema as S

T = TypeVar("T")

# arguments that are gone, with what replaced them
RENAMED = {
    "mask": "a token filter is the sampler's 'allowed' list ('attention' is the mask over "
    "the context)",
    "logprobs": "ask outputs=[{'top_k': k}] (or {'logprobs': [ids]} for chosen ids)",
}


def einval(message: str) -> StoreError:
    return StoreError(errno.EINVAL, message)


def parse(args: Any, kind: type[T]) -> T:
    """`args` (a request's map) as a `kind` struct.

    Raises:
        StoreError: EINVAL saying which field is wrong and how.
    """
    if not isinstance(args, dict):
        raise einval("args must be a map")
    if kind is S.Forward:
        for old, new in RENAMED.items():
            if old in args:
                raise einval(f"forward takes no {old!r} now: {new}")
    try:
        return msgspec.convert(args, kind)
    except msgspec.ValidationError as exc:
        raise einval(f"bad arguments: {_sentence(str(exc))}") from None


def _sentence(message: str) -> str:
    """msgspec's message, with the field named as the call's arguments name it."""
    return message.replace("`$.", "`").replace(" - at `$`", "")


def sampling_params(spec: S.Sampler | None, vocab_size: int) -> SamplingParams:
    """The engine's sampler from its checked wire form (None: the defaults)."""
    spec = spec or S.Sampler()
    try:
        params = SamplingParams(
            temperature=spec.temperature,
            top_k=spec.top_k,
            top_p=spec.top_p,
            min_p=spec.min_p,
            seed=spec.seed,
            logit_bias=spec.logit_bias,
            allowed_token_ids=None if spec.allowed is None else frozenset(spec.allowed),
            blocked_token_ids=frozenset(spec.blocked),
        )
        params.check_vocab(vocab_size)
    except ValueError as exc:
        raise einval(str(exc)) from None
    return params
