"""The trio flavour of the client: many calls in flight on one connection.

import trio
from symphony.lipctl.aio import connect

async def main():
    async with await connect() as lip:
        kv = await lip.kv("a.kv", create=True)
        await kv.append(await lip.tokenize("Hello"))
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(branch, kv, i)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from symphony.lipctl.client import (
    SymphonyError,
    forward_args,
    generate_args,
    socket_path,
    with_mode,
)
from symphony.sched.protocol import FrameBuffer, FrameError, encode


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

    async def stream_call(self, call_name: str, /, **args: Any) -> AsyncIterator[Any]:
        """Yield the call's stream items, then one final {"result": ...} item."""
        rid = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._waiters[rid] = send
        try:
            frame = encode({"id": rid, "call": call_name, "args": args})
            # a frame half sent would garble every later call: once begun, it is finished
            with trio.CancelScope(shield=True):
                async with self._lock:
                    await self._stream.send_all(frame)
            async for frame in receive:
                if "stream" in frame:
                    yield frame["stream"]
                    continue
                if frame.get("ok"):
                    yield {"result": frame.get("result")}
                    return
                raise SymphonyError(frame.get("errno", "EIO"), frame.get("message", "failed"))
            raise SymphonyError("ECONNRESET", "the server closed the connection")
        finally:
            del self._waiters[rid]

    async def call(self, call_name: str, /, **args: Any) -> Any:
        last: Any = None
        async for item in self.stream_call(call_name, **args):
            last = item
        return last["result"]

    async def tokenize(self, text: str) -> list[int]:
        return list(await self.call("tokenize", text=text))

    async def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return str(await self.call("detokenize", ids=list(ids), skip_special=skip_special))

    async def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        return list(
            await self.call(
                "apply_chat_template",
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
            )
        )

    async def kv(self, path: str, create: bool = False, mode: int | None = None) -> AsyncKV:
        await self.call("kv_open", **with_mode({"path": path, "create": create}, mode))
        return AsyncKV(self, path)

    async def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        await self.call("mkdir", path=path, mode=mode, parents=parents)

    async def status(self) -> dict[str, Any]:
        return dict(await self.call("status"))


class AsyncKV:
    """A KV file, by path, for trio programs."""

    def __init__(self, lip: AsyncLip, path: str) -> None:
        self.lip = lip
        self.path = path

    async def stat(self) -> dict[str, Any]:
        return dict(await self.lip.call("kv_stat", path=self.path))

    async def append(self, token_ids: Sequence[int]) -> int:
        result = await self.lip.call("forward", path=self.path, tokens=list(token_ids))
        return int(result["tokens"])

    async def forward(
        self,
        token_ids: Sequence[int],
        logprobs: int = 0,
        mask: Sequence[int] | None = None,
        **sampler: Any,
    ) -> dict[str, Any]:
        args = forward_args(self.path, token_ids, logprobs, mask, sampler)
        return dict(await self.lip.call("forward", **args))

    async def generate(
        self, max_tokens: int = 256, stop: Sequence[str | int] = (), **sampler: Any
    ) -> str:
        args = generate_args(self.path, max_tokens, stop, sampler)
        return str((await self.lip.call("generate", **args))["text"])

    async def fork(self, dst: str, mode: int | None = None) -> AsyncKV:
        await self.lip.call("kv_fork", **with_mode({"src": self.path, "dst": dst}, mode))
        return AsyncKV(self.lip, dst)

    async def truncate(self, num_tokens: int) -> None:
        await self.lip.call("kv_truncate", path=self.path, n=num_tokens)

    async def unlink(self) -> None:
        await self.lip.call("kv_unlink", path=self.path)


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
