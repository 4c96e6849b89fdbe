"""One HTTP response: a JSON body, or server-sent events written by a task of their own.

hypercorn shields its socket writes from cancellation, so a client that keeps its
connection open and reads nothing would hold a request (its KV pages, its turn) for as
long as it liked if the request wrote its own events. Here the request hands each
event to a writer through a small buffer and never waits on the socket; when the buffer
stays full for `stall_seconds`, the client has read nothing for that long, and the
request's work is cancelled as if the client had gone: its pages and its turn are
free. (The writer itself waits in hypercorn's write until the client reads or goes: a
task and at most BUFFERED_EVENTS events of memory.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from symphony.lipctl.openai_api.errors import ApiError

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
BUFFERED_EVENTS = 64  # events a request may run ahead of its client
DONE = b"data: [DONE]\n\n"


class Response:
    """A JSON body (`json`), or a stream of events (`event` ... `done`) that `write`,
    run as a task beside the request, sends."""

    def __init__(self, send: Send, stall_seconds: float = math.inf) -> None:
        self._send = send
        self.stall_seconds = stall_seconds
        self.started = False  # the stream's headers are on their way: errors go in it
        self._headers_sent = False
        self.work: trio.CancelScope | None = None  # the request's work, ended on a stall
        self.stalled = False
        self.stopped = False  # the server is stopping: the work was cancelled
        self._events, self._queued = trio.open_memory_channel[bytes](BUFFERED_EVENTS)

    def stop(self) -> None:
        """Cancel the request's work: the server is stopping."""
        self.stopped = True
        if self.work is not None:
            self.work.cancel()

    async def json(self, status: int, body: dict[str, Any]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await self._send({"type": "http.response.body", "body": msgspec.json.encode(body)})

    async def error(self, exc: ApiError) -> None:
        if self.started:  # headers went out: the stream carries it
            await self.event(exc.body())
            await self.done()
            return
        await self.json(exc.status, exc.body())

    async def event(self, body: dict[str, Any]) -> None:
        """Queue one event; if the queue stays full for `stall_seconds`, cancel `work`."""
        if self.stalled:  # nobody reads: what the request still says goes nowhere
            return
        data = b"data: " + msgspec.json.encode(body) + b"\n\n"
        self.started = True
        with trio.move_on_after(self.stall_seconds):
            await self._events.send(data)
            return
        log.info("client read nothing for %g s: its request is cancelled", self.stall_seconds)
        self.stalled = True
        if self.work is not None:
            self.work.cancel()
        await trio.lowlevel.checkpoint()  # in `work`: raises Cancelled

    async def done(self) -> None:
        """Queue the stream's end; the writer ends after sending it."""
        self.started = True
        if not self.stalled:
            with trio.move_on_after(self.stall_seconds):
                await self._events.send(DONE)
        self._events.close()

    def close(self) -> None:
        """No more events: the writer sends what is queued and ends."""
        self._events.close()

    async def write(self) -> None:
        """Send the queued events, the stream's headers first, until it is closed."""
        async with self._queued:
            async for data in self._queued:
                if not self._headers_sent:
                    self._headers_sent = True
                    start = {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                    await self._send(start)
                more = data != DONE
                await self._send({"type": "http.response.body", "body": data, "more_body": more})
                if not more:
                    return
