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
import socket
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from symphony.lipctl.results import (
    ForwardResult,
    GenerateResult,
    Output,
    Piece,
    Usage,
    VerifyResult,
    logit_values,
)
from symphony.lipctl.wire import (
    ForwardRequests,
    SymphonyError,
    decode,
    final_result,
    generate_args,
    mapped,
    score_args,
    score_means,
    socket_path,
    verify_args,
    with_mode,
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

    def kv_concat(
        self, dst: str, srcs: Sequence[str], reposition: bool = True, mode: int | None = None
    ) -> KV:
        """A new KV file at `dst` holding the tokens of the files `srcs` (1..64, each
        readable) one after another. Each piece keeps the K/V it was computed with alone,
        so attention across pieces is an approximation of computing the whole.

        Args:
            dst: the new file's path (EEXIST if it exists); mode 0600 unless `mode` says.
            srcs: the pieces, in order (one may come twice).
            reposition: each piece moves to follow the one before, its keys re-rotated
                (False: every token keeps its position).

        Raises:
            SymphonyError: EEXIST, ENOENT, EACCES, EBUSY (an append to a source is in
                flight), EINVAL (too long), ENOSPC (then nothing is made).
        """
        args = {"dst": dst, "srcs": list(srcs), "reposition": reposition}
        self.call("kv_concat", **with_mode(args, mode))
        return KV(self, dst)

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


class KV(ForwardRequests):
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

    def forward(
        self,
        tokens: Sequence[int],
        *,
        positions: Sequence[int] | None = None,
        attention: Sequence[Sequence[int] | None] | None = None,
        outputs: Sequence[Mapping[str, Any]] | None = None,
        keep: bool = True,
        grammar: Mapping[str, Any] | None = None,
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
            grammar: the call's own grammar, constraining the sample after its last
                token ({"json_schema": {...}}, {"json_object": True}, {"regex": "..."}
                or {"lark": "..."}); a file's own grammar (`constrain`) needs none.
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
            tokens,
            positions=positions,
            attention=attention,
            outputs=outputs,
            keep=keep,
            grammar=grammar,
            **sampler,
        )
        return decode(self.lip.call("forward", **args), ForwardResult)

    def verify(
        self,
        draft: Sequence[int],
        tokens: Sequence[int] = (),
        draft_probs: Sequence[Mapping[int, float]] | None = None,
        grammar: Mapping[str, Any] | None = None,
        ahead: bool = False,
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
            grammar: the call's own grammar for the draft and the next token (a draft
                token it refuses is rejected); as `forward`'s.
            ahead: also return, in `ahead`, the likeliest token after each of
                draft[accepted:], the rejected one first (the next guesses of Jacobi
                decoding; with a grammar, as far as it allows the draft).
            **sampler: as `forward`'s; greedy by default.

        Raises:
            SymphonyError: the call failed.
        """
        args = verify_args(self.path, draft, tokens, draft_probs, sampler, grammar, ahead)
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

    def sample(self, grammar: Mapping[str, Any] | None = None, **sampler: Any) -> int:
        """A token sampled after the file's last one (as `grammar`, or the file's own,
        allows), appending nothing.

        Raises:
            SymphonyError: the call failed (EINVAL for an empty file).
        """
        outputs = [{"at": -1, "sample": True}]
        result = self.forward([], outputs=outputs, keep=False, grammar=grammar, **sampler)
        if result.token is None:
            raise SymphonyError("EPROTO", "the server answered a sample without a token")
        return result.token

    def generate_stream(
        self,
        max_tokens: int = 256,
        stop: Sequence[str | int] = (),
        logprobs: int = 0,
        grammar: Mapping[str, Any] | None = None,
        **sampler: Any,
    ) -> Generator[Piece, None, GenerateResult]:
        """Yield the generated text as `Piece`s (text, token_ids); return
        (StopIteration.value) the `GenerateResult` at the end.

        Closing it early (`close()`, a `break`, garbage collection) cancels the generate:
        the file keeps what was generated. `contextlib.closing(...)` closes it surely.
        """
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler, True, grammar)
        items = self.lip.stream_call("generate", **args)
        return mapped(
            items, lambda raw: decode(raw, Piece), lambda raw: decode(raw, GenerateResult)
        )

    def generate(
        self,
        max_tokens: int = 256,
        stop: Sequence[str | int] = (),
        logprobs: int = 0,
        grammar: Mapping[str, Any] | None = None,
        **sampler: Any,
    ) -> GenerateResult:
        """Generate (and append) up to `max_tokens` tokens, ending at a stop token or
        string (`stop`: strings and token ids).

        Args:
            max_tokens: 1..8192.
            stop: strings and token ids that end the generation (with the model's own).
            logprobs: 0..20: per generated token its logprob and that many alternatives.
            grammar: the call's own grammar for what is generated (as `forward`'s); on
                a file with a grammar (`constrain`) the file's applies. A grammar that
                is complete ends the generation with finish_reason "stop".
            **sampler: as `forward`'s.

        Returns:
            text, token_ids, finish_reason, tokens (the file's length), usage, logprobs.

        Raises:
            SymphonyError: the call failed.
        """
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler, grammar=grammar)
        return decode(self.lip.call("generate", **args), GenerateResult)

    def fork(self, dst: str, mode: int | None = None) -> KV:
        """A copy-on-write copy at `dst`, sharing every page."""
        self.lip.call("kv_fork", **with_mode({"src": self.path, "dst": dst}, mode))
        return KV(self.lip, dst)

    def truncate(self, num_tokens: int) -> None:
        """Roll back to the first `num_tokens` tokens."""
        self.lip.call("kv_truncate", path=self.path, n=num_tokens)

    def constrain(self, grammar: Mapping[str, Any] | None) -> None:
        """Attach `grammar` to the file: every token appended from now on must match it
        (an append it refuses is EINVAL naming the token), `generate` and samples follow
        it, and its state goes with the file (fork, truncate, cp, --state). None frees
        the file of its grammar.

        Raises:
            SymphonyError: EINVAL with the parser's message for a bad grammar.
        """
        self.lip.call(
            "kv_constrain", path=self.path, grammar=None if grammar is None else dict(grammar)
        )

    def drop(self, start: int, end: int, reposition: bool = False) -> None:
        """Remove tokens [start, end); the tokens after keep their K/V and positions, or
        with `reposition` move down to close the gap, their keys re-rotated there."""
        args = {"path": self.path, "start": start, "end": end, "reposition": reposition}
        self.lip.call("kv_drop", **args)

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
