"""The wire form of the calls, shared by both clients: argument maps from keyword
arguments, answers checked against their structs, errors as SymphonyError."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from symphony.lipctl.results import ForwardResult

DEFAULT_SOCKET = "/tmp/symphony.sock"
SAMPLER_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "logit_bias",
    "allowed",
    "blocked",
)
T = TypeVar("T")
R = TypeVar("R")


class SymphonyError(Exception):
    """A syscall failed. `errno` is its name (EACCES, ENOENT, ENOSPC, EINVAL...)."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message


def first_error(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: what a task raised, where trio
    (a nursery, `connect`'s among them) wrapped it."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def socket_path(path: str | None = None) -> str:
    """`path`, else $SYMPHONY_SOCKET, else the default socket."""
    return path or os.environ.get("SYMPHONY_SOCKET") or DEFAULT_SOCKET


def decode(raw: Any, kind: type[T]) -> T:
    """`raw` (a call's result as the wire gave it) as a `kind` struct of lipctl.results.

    Raises:
        SymphonyError: EPROTO when the answer does not have `kind`'s shape.
    """
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message = f"unexpected {kind.__name__} from the server: {exc}"
        raise SymphonyError("EPROTO", message) from None


def final_result(frame: dict[str, Any]) -> Any:
    """A final frame's result.

    Raises:
        SymphonyError: the call failed (the frame's errno and message).
    """
    if frame.get("ok"):
        return frame.get("result")
    raise SymphonyError(frame.get("errno", "EIO"), frame.get("message", "call failed"))


# the wire form of calls, shared by both clients --------------------------------------


def sampler_args(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of a sampler (SAMPLER_FIELDS); fields left None take the server's
    defaults.

    Raises:
        TypeError: a field that is not a sampler's, naming the form that replaced it.
    """
    if "mask" in fields:
        raise TypeError("mask= is gone: pass allowed=[ids], the sampler field")
    if "logprobs" in fields:
        raise TypeError(
            'forward(logprobs=k) is gone: pass outputs=[{"top_k": k}] (k likeliest next '
            'tokens), or outputs=[{"logprobs": [ids]}] for chosen ids'
        )
    unknown = sorted(set(fields) - set(SAMPLER_FIELDS))
    if unknown:
        names = ", ".join(unknown)
        raise TypeError(f"not sampler fields: {names}; a sampler takes {', '.join(SAMPLER_FIELDS)}")
    spec = {k: v for k, v in fields.items() if v is not None}
    for name in ("allowed", "blocked"):
        if name in spec:
            spec[name] = list(spec[name])
    return spec


def forward_args(
    path: str,
    tokens: Sequence[int],
    *,
    positions: Sequence[int] | None = None,
    attention: Sequence[Sequence[int] | None] | None = None,
    outputs: Sequence[Mapping[str, Any]] | None = None,
    keep: bool = True,
    sampler: Mapping[str, Any],
    grammar: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Arguments of `forward` (one entry of `forward_many`); see `KV.forward`."""
    args: dict[str, Any] = {"path": path, "tokens": list(tokens)}
    if positions is not None:
        args["positions"] = list(positions)
    if attention is not None:
        args["attention"] = [None if a is None else list(a) for a in attention]
    if outputs is not None:
        args["outputs"] = [dict(o) for o in outputs]
    if not keep:
        args["keep"] = False
    if spec := sampler_args(sampler):
        args["sampler"] = spec
    return with_grammar(args, grammar)


def verify_args(
    path: str,
    draft: Sequence[int],
    tokens: Sequence[int],
    draft_probs: Sequence[Mapping[int, float]] | None,
    sampler: Mapping[str, Any],
    grammar: Mapping[str, Any] | None = None,
    ahead: bool = False,
) -> dict[str, Any]:
    """Arguments of `verify`; see `KV.verify`."""
    args: dict[str, Any] = {"path": path, "draft": list(draft), "tokens": list(tokens)}
    if ahead:
        args["ahead"] = True
    if draft_probs is not None:
        args["draft_probs"] = [dict(p) for p in draft_probs]
    if spec := sampler_args(sampler):
        args["sampler"] = spec
    return with_grammar(args, grammar)


def generate_args(
    path: str,
    max_tokens: int,
    stop: Sequence[str | int],
    logprobs: int,
    sampler: Mapping[str, Any],
    stream: bool = False,
    grammar: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Arguments of `generate`; see `KV.generate`."""
    args = {
        "path": path,
        "max_tokens": max_tokens,
        "sampler": sampler_args(sampler),
        "stop": list(stop),
        "stream": stream,
    }
    if logprobs:
        args["logprobs"] = logprobs
    return with_grammar(args, grammar)


def score_args(
    path: str, num_tokens: int, choices: Sequence[Sequence[int]], next_position: int | None = None
) -> dict[str, Any]:
    """One keep=False forward scoring every choice after a file of `num_tokens` tokens.

    The choices are concatenated; each one's tokens take the positions right after the
    file's end (`next_position`, by default num_tokens, then on) and see the file and
    their own earlier tokens, never another choice. The output at -1 asks the logprobs
    of every choice's first token; the one at each choice token but its last, that of
    its next token.

    Raises:
        SymphonyError: EINVAL for an empty file (nothing predicts a first token) or an
            empty choice or no choice.
    """
    if num_tokens < 1:
        raise SymphonyError("EINVAL", "score needs a file with tokens: its last predicts the first")
    if not choices or not all(choices):
        raise SymphonyError("EINVAL", "score needs at least one choice, each of 1 token or more")
    first_ids = list(dict.fromkeys(c[0] for c in choices))
    tokens: list[int] = []
    positions: list[int] = []
    attention: list[list[int] | None] = []
    outputs: list[dict[str, Any]] = [{"at": -1, "logprobs": first_ids}]
    for choice in choices:
        start = len(tokens)  # the new-token index where this choice begins
        for j, token in enumerate(choice):
            own = num_tokens + start  # the choice's first token, as an index of the file
            tokens.append(token)
            positions.append((num_tokens if next_position is None else next_position) + j)
            # the first choice follows the file: causal is what it needs
            attention.append(None if start == 0 else [0, num_tokens, own, own + j + 1])
            if j + 1 < len(choice):
                outputs.append({"at": start + j, "logprobs": [choice[j + 1]]})
    return forward_args(
        path,
        tokens,
        positions=positions,
        attention=attention,
        outputs=outputs,
        keep=False,
        sampler={},
    )


def score_means(
    result: ForwardResult, num_tokens: int, choices: Sequence[Sequence[int]]
) -> list[float]:
    """Each choice's mean logprob per token, from the answer to `score_args`.

    Raises:
        SymphonyError: EAGAIN when the file's length changed between the stat and the
            forward (the answer then scored other positions); EPROTO for a malformed
            answer.
    """
    if result.tokens != num_tokens:
        raise SymphonyError(
            "EAGAIN", f"the file went from {num_tokens} to {result.tokens} tokens while scored"
        )
    # (at, id) -> logprob of every id asked
    logprobs = {(o.at, i): lp for o in result.outputs for i, lp in (o.logprobs or ())}
    means = []
    start = 0  # where the choice begins among the new tokens
    for choice in choices:
        asked = [(-1, choice[0])] + [(start + j, t) for j, t in enumerate(choice[1:])]
        missing = [a for a in asked if a not in logprobs]
        if missing:
            raise SymphonyError("EPROTO", f"score: no logprob (at, id) {missing[0]} in the answer")
        means.append(sum(logprobs[a] for a in asked) / len(choice))
        start += len(choice)
    return means


def with_mode(args: dict[str, Any], mode: int | None) -> dict[str, Any]:
    return args if mode is None else {**args, "mode": mode}


def with_grammar(args: dict[str, Any], grammar: Mapping[str, Any] | None) -> dict[str, Any]:
    """`args` with a call's own grammar: {"json_schema": {...}}, {"json_object": True},
    {"regex": "..."} or {"lark": "..."}."""
    return args if grammar is None else {**args, "grammar": dict(grammar)}


def mapped(
    items: Generator[Any, None, Any], item: Callable[[Any], T], result: Callable[[Any], R]
) -> Generator[T, None, R]:
    """`items` with each stream item and the result converted; closing it closes `items`
    (which cancels the call if unanswered)."""
    try:
        while True:
            try:
                raw = next(items)
            except StopIteration as stop:
                return result(stop.value)
            yield item(raw)
    finally:
        items.close()


class ForwardRequests:
    """What both flavours' KV files share: building a forward's arguments."""

    path: str

    def request(
        self,
        tokens: Sequence[int],
        *,
        positions: Sequence[int] | None = None,
        attention: Sequence[Sequence[int] | None] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        keep: bool = True,
        grammar: Mapping[str, Any] | None = None,
        **sampler: Any,
    ) -> dict[str, Any]:
        """The argument map of a forward on this file, for `lip.forward_many`; takes what
        `forward` takes and sends nothing (not a coroutine in either client).

        Raises:
            TypeError: an old form (logprobs=k, mask=...) or a field no sampler has.
        """
        return forward_args(
            self.path,
            tokens,
            positions=positions,
            attention=attention,
            outputs=outputs,
            keep=keep,
            sampler=sampler,
            grammar=grammar,
        )
