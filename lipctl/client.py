"""The client library LIPs import: `connect()`, then KV files and the model through syscalls.

    from symphony.lipctl import connect

    with connect() as lip:
        kv = lip.kv("demo/prefix.kv", create=True)
        kv.append(lip.tokenize("You are a poet."))
        a = kv.fork("demo/a.kv")
        print(a.generate(max_tokens=32, temperature=0).text)

`lipctl.aio` has the same calls for trio programs, many in flight at once. Results are
the structs of `lipctl.results`. Imports no torch: a LIP starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from symphony.lipctl.results import (
    ForwardResult,
    GenerateResult,
    Output,
    Piece,
    Usage,
    VerifyResult,
    logit_values,
)
from symphony.sched.protocol import FrameBuffer, encode

__all__ = [
    "KV",
    "ForwardResult",
    "GenerateResult",
    "Lip",
    "Output",
    "Piece",
    "SymphonyError",
    "Usage",
    "VerifyResult",
    "connect",
    "logit_values",
]

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
    return args


def verify_args(
    path: str,
    draft: Sequence[int],
    tokens: Sequence[int],
    draft_probs: Sequence[Mapping[int, float]] | None,
    sampler: Mapping[str, Any],
) -> dict[str, Any]:
    """Arguments of `verify`; see `KV.verify`."""
    args: dict[str, Any] = {"path": path, "draft": list(draft), "tokens": list(tokens)}
    if draft_probs is not None:
        args["draft_probs"] = [dict(p) for p in draft_probs]
    if spec := sampler_args(sampler):
        args["sampler"] = spec
    return args


def generate_args(
    path: str,
    max_tokens: int,
    stop: Sequence[str | int],
    logprobs: int,
    sampler: Mapping[str, Any],
    stream: bool = False,
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
    return args


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


class Lip:
    """A connection to the server: one call at a time (see `aio` for many at once)."""

    def __init__(self, path: str | None = None) -> None:
        self.socket_path = socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            raise SymphonyError(
                "ECONNREFUSED", f"no Symphony server at {self.socket_path}: {exc.strerror}"
            ) from None
        self._ids = itertools.count(1)
        self._frames = FrameBuffer()
        self._pending: list[dict[str, Any]] = []
        self.info = self.call("hello")

    def close(self) -> None:
        """Close the connection: the server cancels whatever it still runs for it."""
        self._sock.close()

    def __enter__(self) -> Lip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the wire -----------------------------------------------------------------------

    def _next_frame(self) -> dict[str, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise SymphonyError("ECONNRESET", "the server closed the connection")
            self._frames.feed(data)
            self._pending.extend(self._frames.frames())
        return self._pending.pop(0)

    def _cancel(self, rid: int) -> None:
        with contextlib.suppress(OSError):  # a connection gone has nothing left to cancel
            self._sock.sendall(encode({"cancel": rid}))

    def stream_call(self, call_name: str, /, **args: Any) -> Generator[Any, None, Any]:
        """Send one call (at the first `next`); yield its stream items; return
        (StopIteration.value) its result.

        Closed before the end (`close()`, a `break` out of a for loop, garbage
        collection, an exception such as KeyboardInterrupt while waiting), it sends a
        cancel frame; what the server still sends for the call is skipped by later calls.

        Raises:
            SymphonyError: the call failed, or the connection is gone (ECONNRESET).
        """
        rid = next(self._ids)
        self._sock.sendall(encode({"id": rid, "call": call_name, "args": args}))
        answered = False
        try:
            while True:
                frame = self._next_frame()
                if frame.get("id") not in (rid, None):
                    continue  # for a call given up on
                if "stream" in frame:
                    yield frame["stream"]
                    continue
                answered = True
                return final_result(frame)
        finally:
            if not answered:
                self._cancel(rid)

    def call(self, call_name: str, /, **args: Any) -> Any:
        """Send one call and return its result (stream items are dropped).

        Raises:
            SymphonyError: the call failed.
        """
        it = self.stream_call(call_name, **args)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    # the model ----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """The served model's token ids of `text` (control tokens written in it count)."""
        return list(self.call("tokenize", text=text))

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of token `ids`."""
        return str(self.call("detokenize", ids=list(ids), skip_special=skip_special))

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The token ids of `messages` ({"role", "content"} maps) in the model's template."""
        return list(
            self.call(
                "apply_chat_template",
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
            )
        )

    def forward_many(self, requests: Sequence[Mapping[str, Any]]) -> list[ForwardResult]:
        """Several forwards, each on its own file, computed in the same engine step(s).

        Args:
            requests: forward argument maps, as `kv.request(tokens, ...)` builds them
                (at most 64, every file distinct).

        Returns:
            Their results, in order.

        Raises:
            SymphonyError: one was refused (the message names `calls[i]`); then none ran.
        """
        results = self.call("forward_many", calls=[dict(r) for r in requests])
        return decode(results, list[ForwardResult])

    # files and programs -------------------------------------------------------------

    def kv(
        self, path: str, create: bool = False, exclusive: bool = False, mode: int | None = None
    ) -> KV:
        """Open the KV file at `path` (made empty first with `create` if missing;
        `exclusive`: it must not exist). New files are mode 0600 unless `mode` says."""
        args = {"path": path, "create": create, "exclusive": exclusive}
        self.call("kv_open", **with_mode(args, mode))
        return KV(self, path)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        """Make a folder (with its missing parents if `parents`)."""
        self.call("mkdir", path=path, mode=mode, parents=parents)

    def listdir(self, path: str = "") -> list[str]:
        """The names in a folder (default the root)."""
        return list(self.call("listdir", path=path))

    def status(self) -> dict[str, Any]:
        """The server's status: pages (total, used, cached, free), files, processes..."""
        return dict(self.call("status"))

    def ps(self) -> list[dict[str, Any]]:
        """The process table's rows (pid, uid, state, name...)."""
        return list(self.call("ps"))

    def spawn(
        self,
        program: str,
        args: Sequence[str] = (),
        name: str = "program.py",
        env: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> int:
        """Run `program` (Python source) on the server as the caller; returns its pid."""
        result = self.call(
            "spawn", program=program, args=list(args), name=name, env=env or {}, limits=limits or {}
        )
        return int(result["pid"])

    def kill(self, pid: int) -> dict[str, Any]:
        """Kill a program; returns its process-table row."""
        return dict(self.call("kill", pid=pid))

    def wait(self, pid: int) -> Generator[dict[str, Any], None, Any]:
        """Yield a program's output ({"fd", "data"}) from its start; return
        (StopIteration.value) its process-table row once it ended."""
        return self.stream_call("wait", pid=pid)


class KV:
    """A KV file, by path."""

    def __init__(self, lip: Lip, path: str) -> None:
        self.lip = lip
        self.path = path

    def __repr__(self) -> str:
        return f"KV({self.path!r})"

    def stat(self) -> dict[str, Any]:
        """At least `tokens`, `pages`, `shared_pages` and `origin`."""
        return dict(self.lip.call("kv_stat", path=self.path))

    def append(self, token_ids: Sequence[int]) -> int:
        """Prefill: append and compute `token_ids`; returns the file's token count."""
        return int(self.lip.call("forward", path=self.path, tokens=list(token_ids))["tokens"])

    def request(
        self,
        tokens: Sequence[int],
        *,
        positions: Sequence[int] | None = None,
        attention: Sequence[Sequence[int] | None] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        keep: bool = True,
        **sampler: Any,
    ) -> dict[str, Any]:
        """The argument map of a forward on this file, for `lip.forward_many`; takes what
        `forward` takes and sends nothing.

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
        )

    def forward(
        self,
        tokens: Sequence[int],
        *,
        positions: Sequence[int] | None = None,
        attention: Sequence[Sequence[int] | None] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        keep: bool = True,
        **sampler: Any,
    ) -> ForwardResult:
        """Append `tokens`, compute them, and answer what `outputs` asks.

        Args:
            tokens: new token ids ([] only when an output asks at -1).
            positions: one position per new token; default the ones after the file's last.
            attention: per new token None (causal) or flat half-open ranges
                [s0, e0, s1, e1...] of the file's token indices it sees.
            outputs: maps {"at": i or [i...], "sample", "logprobs": [ids], "top_k": k,
                "entropy", "logits"}; `at` counts new tokens, -1 is after the file's
                last token. Default with sampler fields: sample after the last token.
            keep: False: compute and answer but append nothing (read permission only).
            **sampler: temperature, top_p, top_k, min_p, seed, logit_bias, allowed,
                blocked.

        Returns:
            The file's length, the cached count, the outputs, and the last sampled
            token (`.token`; not appended).

        Raises:
            TypeError: an old form: logprobs=k (now outputs=[{"top_k": k}]) or mask=
                (now allowed=).
            SymphonyError: the call failed (ECANCELED when cancelled).
        """
        args = self.request(
            tokens, positions=positions, attention=attention, outputs=outputs, keep=keep, **sampler
        )
        return decode(self.lip.call("forward", **args), ForwardResult)

    def verify(
        self,
        draft: Sequence[int],
        tokens: Sequence[int] = (),
        draft_probs: Sequence[Mapping[int, float]] | None = None,
        **sampler: Any,
    ) -> VerifyResult:
        """Speculative verification in one engine step: append `tokens` + `draft`, keep
        the longest accepted prefix of the draft, and return the correction (or bonus)
        token, not appended: pass it as the next call's `tokens`.

        Args:
            draft: 1..64 guessed tokens following `tokens`.
            tokens: known next tokens (usually the one a previous call returned).
            draft_probs: per draft token, the drafter's {id: prob} (default a point mass:
                a deterministic drafter); used when sampling (temperature > 0).
            **sampler: as `forward`'s; greedy by default.

        Raises:
            SymphonyError: the call failed.
        """
        args = verify_args(self.path, draft, tokens, draft_probs, sampler)
        return decode(self.lip.call("verify", **args), VerifyResult)

    def score(self, choices: Sequence[Sequence[int]]) -> list[float]:
        """The mean logprob per token of each choice (token ids) following the file, in
        one forward that appends nothing (`score_args`), at the positions after the
        file's last.

        Raises:
            SymphonyError: EINVAL for an empty file or choice; EAGAIN when the file
                changed length meanwhile (score again).
        """
        stat = self.stat()
        num_tokens = int(stat["tokens"])
        args = score_args(self.path, num_tokens, choices, stat.get("next_position"))
        result = decode(self.lip.call("forward", **args), ForwardResult)
        return score_means(result, num_tokens, choices)

    def sample(self, **sampler: Any) -> int:
        """A token sampled after the file's last one, appending nothing.

        Raises:
            SymphonyError: the call failed (EINVAL for an empty file).
        """
        outputs = [{"at": -1, "sample": True}]
        result = self.forward([], outputs=outputs, keep=False, **sampler)
        if result.token is None:
            raise SymphonyError("EPROTO", "the server answered a sample without a token")
        return result.token

    def generate_stream(
        self,
        max_tokens: int = 256,
        stop: Sequence[str | int] = (),
        logprobs: int = 0,
        **sampler: Any,
    ) -> Generator[Piece, None, GenerateResult]:
        """Yield the generated text as `Piece`s (text, token_ids); return
        (StopIteration.value) the `GenerateResult` at the end.

        Closing it early (`close()`, a `break`, garbage collection) cancels the generate:
        the file keeps what was generated. `contextlib.closing(...)` closes it surely.
        """
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler, stream=True)
        items = self.lip.stream_call("generate", **args)
        return mapped(
            items, lambda raw: decode(raw, Piece), lambda raw: decode(raw, GenerateResult)
        )

    def generate(
        self,
        max_tokens: int = 256,
        stop: Sequence[str | int] = (),
        logprobs: int = 0,
        **sampler: Any,
    ) -> GenerateResult:
        """Generate (and append) up to `max_tokens` tokens, ending at a stop token or
        string (`stop`: strings and token ids).

        Args:
            max_tokens: 1..8192.
            stop: strings and token ids that end the generation (with the model's own).
            logprobs: 0..20: per generated token its logprob and that many alternatives.
            **sampler: as `forward`'s.

        Returns:
            text, token_ids, finish_reason, tokens (the file's length), usage, logprobs.

        Raises:
            SymphonyError: the call failed.
        """
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler)
        return decode(self.lip.call("generate", **args), GenerateResult)

    def fork(self, dst: str, mode: int | None = None) -> KV:
        """A copy-on-write copy at `dst`, sharing every page."""
        self.lip.call("kv_fork", **with_mode({"src": self.path, "dst": dst}, mode))
        return KV(self.lip, dst)

    def truncate(self, num_tokens: int) -> None:
        """Roll back to the first `num_tokens` tokens."""
        self.lip.call("kv_truncate", path=self.path, n=num_tokens)

    def unlink(self) -> None:
        """Remove the file's name (its pages go with its last name and user)."""
        self.lip.call("kv_unlink", path=self.path)

    def kv_verify(self) -> dict[str, Any]:
        """Recompute the file: `max_abs_diff` from the engine's K/V, `match`, `origin`
        (a match makes an imported file computed)."""
        return dict(self.lip.call("kv_verify", path=self.path))


def connect(path: str | None = None) -> Lip:
    """Connect to the server at `path`, else $SYMPHONY_SOCKET, else /tmp/symphony.sock."""
    return Lip(path)
