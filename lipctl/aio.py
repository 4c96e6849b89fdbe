"""The trio flavour of the client: the same calls as `client`, many in flight on one
connection.

    import trio
    from symphony.lipctl.aio import connect

    async def main():
        async with connect() as lip:
            kv = await lip.kv("a.kv", create=True)
            await kv.append(await lip.tokenize("Hello"))
            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(branch, kv, i)

A call whose task is cancelled (it leaves a cancel scope) sends the server a cancel frame
before it gives up, so the work stops within an engine step. Streams are objects to
`async with` (which cancels what is left on the way out) and `async for`:

    async with kv.generate_stream(max_tokens=64) as stream:
        async for piece in stream:
            print(piece.text, end="")
    print(stream.result.usage)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from symphony.lipctl.aio_stream import AsyncStream
from symphony.lipctl.results import ForwardResult, GenerateResult, Piece, VerifyResult
from symphony.lipctl.wire import (
    ForwardRequests,
    SymphonyError,
    decode,
    final_result,
    generate_args,
    score_args,
    score_means,
    socket_path,
    verify_args,
    with_mode,
)
from symphony.sched.protocol import FrameBuffer, FrameError, encode

T = TypeVar("T")
R = TypeVar("R")
# a cancel frame is tiny; a server that takes none within this is not reading us at all
CANCEL_SECONDS = 10.0


def _same(value: Any) -> Any:
    return value


class AsyncLip:
    """A connection whose calls may overlap; replies are routed by request id."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._ids = itertools.count(1)
        self._waiters: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._lock = trio.Lock()
        self.info: dict[str, Any] = {}

    async def _read(self) -> None:
        frames = FrameBuffer()
        try:
            while data := await self._stream.receive_some(65536):
                frames.feed(data)
                for frame in frames.frames():
                    channel = self._waiters.get(frame.get("id", -1))
                    if channel is not None:
                        await channel.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
            pass  # the connection is over: every waiting call gets ECONNRESET
        for channel in self._waiters.values():
            channel.close()

    async def aclose(self) -> None:
        """Close the connection: the server cancels whatever it still runs for it."""
        await self._stream.aclose()

    async def _send(self, frame: bytes) -> None:
        # a frame half sent would garble every later call: once begun, it is finished
        with trio.CancelScope(shield=True):
            async with self._lock:
                await self._stream.send_all(frame)

    async def _cancel(self, rid: int) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CANCEL_SECONDS) as scope:
            try:
                async with self._lock:
                    await self._stream.send_all(encode({"cancel": rid}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # gone: the server cancels what the connection ran
        if scope.cancelled_caught:  # stuck, perhaps mid-frame: no later call could work
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _frames(
        self, call_name: str, args: dict[str, Any]
    ) -> AsyncGenerator[tuple[bool, Any], None]:
        """(False, stream item)..., then (True, result); left before, a cancel frame."""
        rid = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._waiters[rid] = send
        unanswered = False  # sent and not answered: to cancel if left
        try:
            frame = encode({"id": rid, "call": call_name, "args": args})
            try:
                await self._send(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise SymphonyError("ECONNRESET", "the connection is closed") from None
            unanswered = True
            async for reply in receive:
                if "stream" in reply:
                    yield False, reply["stream"]
                    continue
                unanswered = False
                yield True, final_result(reply)
                return
            unanswered = False  # the connection is gone, and its calls with it
            raise SymphonyError("ECONNRESET", "the server closed the connection")
        finally:
            del self._waiters[rid]
            if unanswered:
                await self._cancel(rid)

    def _typed_stream(
        self,
        call_name: str,
        args: dict[str, Any],
        item: Callable[[Any], T],
        result: Callable[[Any], R],
    ) -> AsyncStream[T, R]:
        """A streaming call whose items and result are converted by `item` and `result`
        (`decode` into a struct, say); sent at the first item asked."""
        return AsyncStream(self._frames(call_name, args), item, result)

    def stream_call(self, call_name: str, /, **args: Any) -> AsyncStream[Any, Any]:
        """One call, its stream items as they come, then `.result`; sent at the first
        item asked.

        Raises:
            SymphonyError: (while iterating) the call failed.
        """
        return self._typed_stream(call_name, args, _same, _same)

    async def call(self, call_name: str, /, **args: Any) -> Any:
        """Send one call and return its result (stream items are dropped).

        Raises:
            SymphonyError: the call failed.
        """
        async with self.stream_call(call_name, **args) as stream:
            async for _ in stream:
                pass
        return stream.result

    # the model ----------------------------------------------------------------------

    async def tokenize(self, text: str) -> list[int]:
        """The served model's token ids of `text` (control tokens written in it count)."""
        return list(await self.call("tokenize", text=text))

    async def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The text of token `ids`."""
        return str(await self.call("detokenize", ids=list(ids), skip_special=skip_special))

    async def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The token ids of `messages` ({"role", "content"} maps) in the model's template."""
        return list(
            await self.call(
                "apply_chat_template",
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
            )
        )

    async def forward_many(self, requests: Sequence[Mapping[str, Any]]) -> list[ForwardResult]:
        """Several forwards, each on its own file, computed in the same engine step(s).

        Args:
            requests: forward argument maps, as `kv.request(tokens, ...)` builds them
                (at most 64, every file distinct).

        Returns:
            Their results, in order.

        Raises:
            SymphonyError: one was refused (the message names `calls[i]`); then none ran.
        """
        results = await self.call("forward_many", calls=[dict(r) for r in requests])
        return decode(results, list[ForwardResult])

    # files and programs -------------------------------------------------------------

    async def kv(
        self, path: str, create: bool = False, exclusive: bool = False, mode: int | None = None
    ) -> AsyncKV:
        """Open the KV file at `path` (made empty first with `create` if missing;
        `exclusive`: it must not exist). New files are mode 0600 unless `mode` says."""
        args = {"path": path, "create": create, "exclusive": exclusive}
        await self.call("kv_open", **with_mode(args, mode))
        return AsyncKV(self, path)

    async def kv_concat(
        self, dst: str, srcs: Sequence[str], reposition: bool = True, mode: int | None = None
    ) -> AsyncKV:
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
        await self.call("kv_concat", **with_mode(args, mode))
        return AsyncKV(self, dst)

    async def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        """Make a folder (with its missing parents if `parents`)."""
        await self.call("mkdir", path=path, mode=mode, parents=parents)

    async def listdir(self, path: str = "") -> list[str]:
        """The names in a folder (default the root)."""
        return list(await self.call("listdir", path=path))

    async def status(self) -> dict[str, Any]:
        """The server's status: pages (total, used, cached, free), files, processes..."""
        return dict(await self.call("status"))

    async def ps(self) -> list[dict[str, Any]]:
        """The process table's rows (pid, uid, state, name...)."""
        return list(await self.call("ps"))

    async def spawn(
        self,
        program: str,
        args: Sequence[str] = (),
        name: str = "program.py",
        env: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> int:
        """Run `program` (Python source) on the server as the caller; returns its pid."""
        result = await self.call(
            "spawn", program=program, args=list(args), name=name, env=env or {}, limits=limits or {}
        )
        return int(result["pid"])

    async def kill(self, pid: int) -> dict[str, Any]:
        """Kill a program; returns its process-table row."""
        return dict(await self.call("kill", pid=pid))

    def wait(self, pid: int) -> AsyncStream[dict[str, Any], Any]:
        """A program's output ({"fd", "data"}) from its start; `.result` is its
        process-table row once it ended."""
        return self.stream_call("wait", pid=pid)


class AsyncKV(ForwardRequests):
    """A KV file, by path, for trio programs."""

    def __init__(self, lip: AsyncLip, path: str) -> None:
        self.lip = lip
        self.path = path

    def __repr__(self) -> str:
        return f"AsyncKV({self.path!r})"

    async def stat(self) -> dict[str, Any]:
        """At least `tokens`, `pages`, `shared_pages` and `origin`."""
        return dict(await self.lip.call("kv_stat", path=self.path))

    async def append(self, token_ids: Sequence[int]) -> int:
        """Prefill: append and compute `token_ids`; returns the file's token count."""
        result = await self.lip.call("forward", path=self.path, tokens=list(token_ids))
        return int(result["tokens"])

    async def forward(
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
        """Append `tokens`, compute them, and answer what `outputs` asks; the arguments
        are `client.KV.forward`'s.

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
        return decode(await self.lip.call("forward", **args), ForwardResult)

    async def verify(
        self,
        draft: Sequence[int],
        tokens: Sequence[int] = (),
        draft_probs: Sequence[Mapping[int, float]] | None = None,
        grammar: Mapping[str, Any] | None = None,
        ahead: bool = False,
        **sampler: Any,
    ) -> VerifyResult:
        """Speculative verification in one engine step: append `tokens` + `draft`, keep
        the longest accepted prefix, return the correction (or bonus) token, not
        appended; the arguments are `client.KV.verify`'s.

        Raises:
            SymphonyError: the call failed.
        """
        args = verify_args(self.path, draft, tokens, draft_probs, sampler, grammar, ahead)
        return decode(await self.lip.call("verify", **args), VerifyResult)

    async def score(self, choices: Sequence[Sequence[int]]) -> list[float]:
        """The mean logprob per token of each choice (token ids) following the file, in
        one forward that appends nothing (see `client.KV.score`).

        Raises:
            SymphonyError: EINVAL for an empty file or choice; EAGAIN when the file
                changed length meanwhile (score again).
        """
        stat = await self.stat()
        num_tokens = int(stat["tokens"])
        args = score_args(self.path, num_tokens, choices, stat.get("next_position"))
        result = decode(await self.lip.call("forward", **args), ForwardResult)
        return score_means(result, num_tokens, choices)

    async def sample(self, grammar: Mapping[str, Any] | None = None, **sampler: Any) -> int:
        """A token sampled after the file's last one (as `grammar`, or the file's own,
        allows), appending nothing.

        Raises:
            SymphonyError: the call failed (EINVAL for an empty file).
        """
        outputs = [{"at": -1, "sample": True}]
        result = await self.forward([], outputs=outputs, keep=False, grammar=grammar, **sampler)
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
    ) -> AsyncStream[Piece, GenerateResult]:
        """The generated text as `Piece`s (text, token_ids), then `.result`, the
        `GenerateResult`. Left early (`async with` it), the generate is cancelled: the
        file keeps what was generated."""
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler, True, grammar)
        return self.lip._typed_stream(
            "generate",
            args,
            lambda raw: decode(raw, Piece),
            lambda raw: decode(raw, GenerateResult),
        )

    async def generate(
        self,
        max_tokens: int = 256,
        stop: Sequence[str | int] = (),
        logprobs: int = 0,
        grammar: Mapping[str, Any] | None = None,
        **sampler: Any,
    ) -> GenerateResult:
        """Generate (and append) up to `max_tokens` tokens; the arguments are
        `client.KV.generate`'s. Cancelled, the server ends it within a step.

        Raises:
            SymphonyError: the call failed.
        """
        args = generate_args(self.path, max_tokens, stop, logprobs, sampler, grammar=grammar)
        return decode(await self.lip.call("generate", **args), GenerateResult)

    async def fork(self, dst: str, mode: int | None = None) -> AsyncKV:
        """A copy-on-write copy at `dst`, sharing every page."""
        await self.lip.call("kv_fork", **with_mode({"src": self.path, "dst": dst}, mode))
        return AsyncKV(self.lip, dst)

    async def truncate(self, num_tokens: int) -> None:
        """Roll back to the first `num_tokens` tokens."""
        await self.lip.call("kv_truncate", path=self.path, n=num_tokens)

    async def constrain(self, grammar: Mapping[str, Any] | None) -> None:
        """Attach `grammar` to the file: every token appended from now on must match it
        (an append it refuses is EINVAL naming the token), `generate` and samples follow
        it, and its state goes with the file (fork, truncate, cp, --state). None frees
        the file of its grammar.

        Raises:
            SymphonyError: EINVAL with the parser's message for a bad grammar.
        """
        await self.lip.call(
            "kv_constrain", path=self.path, grammar=None if grammar is None else dict(grammar)
        )

    async def drop(self, start: int, end: int, reposition: bool = False) -> None:
        """Remove tokens [start, end); the tokens after keep their K/V and positions, or
        with `reposition` move down to close the gap, their keys re-rotated there."""
        args = {"path": self.path, "start": start, "end": end, "reposition": reposition}
        await self.lip.call("kv_drop", **args)

    async def unlink(self) -> None:
        """Remove the file's name (its pages go with its last name and user)."""
        await self.lip.call("kv_unlink", path=self.path)

    async def kv_verify(self) -> dict[str, Any]:
        """Recompute the file: `max_abs_diff` from the engine's K/V, `match`, `origin`
        (a match makes an imported file computed)."""
        return dict(await self.lip.call("kv_verify", path=self.path))


@asynccontextmanager
async def connect(path: str | None = None) -> AsyncIterator[AsyncLip]:
    """`async with connect() as lip:` a connection with its reader task."""
    try:
        stream = await trio.open_unix_socket(socket_path(path))
    except OSError as exc:
        raise SymphonyError(
            "ECONNREFUSED", f"no Symphony server at {socket_path(path)}: {exc.strerror}"
        ) from None
    async with trio.open_nursery() as nursery:
        lip = AsyncLip(stream)
        nursery.start_soon(lip._read)
        try:
            lip.info = await lip.call("hello")
            yield lip
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await stream.aclose()
