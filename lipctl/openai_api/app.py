"""The HTTP side: a small ASGI app on hypercorn (trio), its routes, bearer keys, and
server-sent events; a client that goes away cancels its request's work at once."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from symphony.lipctl.aio import connect
from symphony.lipctl.openai_api.chat import Service
from symphony.lipctl.openai_api.errors import ApiError, from_symphony
from symphony.lipctl.openai_api.request_files import sweep
from symphony.lipctl.openai_api.requests import MAX_BODY, ChatRequest, CompletionRequest, parse
from symphony.lipctl.openai_api.response import Response, Send
from symphony.lipctl.wire import SymphonyError

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]


class App:
    """ASGI: GET /v1/models, POST /v1/chat/completions and /v1/completions."""

    def __init__(
        self, service: Service, api_key: str | None = None, stall_seconds: float = 60.0
    ) -> None:
        self.service = service
        self.api_key = api_key
        self.stall_seconds = stall_seconds  # a stream's client reading nothing this long
        self._working: set[Response] = set()  # requests whose work runs now
        self.stopping = False

    def stop(self) -> None:
        """Cancel every request's work; each is answered 503 (a stream: an error event)."""
        self.stopping = True
        for response in self._working:
            response.stop()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response = Response(send, self.stall_seconds)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(response.write)
            try:
                self._authorize(scope)
                if self.stopping:
                    raise ApiError(503, "the server is stopping", code="overloaded")
                self._working.add(response)
                await self._route(scope, receive, response)
            except ApiError as exc:
                await response.error(exc)
            except SymphonyError as exc:
                await response.error(from_symphony(exc))
            except Exception:  # a bug answers 500, and the server goes on
                log.exception("request failed")
                await response.error(ApiError(500, "internal error; the server logged it"))
            finally:
                self._working.discard(response)
                response.close()  # the writer sends what is queued, then ends

    def _authorize(self, scope: dict[str, Any]) -> None:
        if self.api_key is None:
            return
        headers = dict(scope.get("headers", []))
        given = headers.get(b"authorization", b"").decode("latin-1")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "Incorrect or missing API key", code="invalid_api_key")

    async def _route(self, scope: dict[str, Any], receive: Receive, response: Response) -> None:
        method, path = scope["method"], scope["path"].rstrip("/")
        service = self.service
        if path == "/v1/models":
            _allow(method, "GET")
            await response.json(200, service.models())
        elif path.startswith("/v1/models/"):
            _allow(method, "GET")
            name = path.removeprefix("/v1/models/")
            service._check_model(name)
            await response.json(200, service.model_card())
        elif path in ("/v1/chat/completions", "/v1/completions"):
            _allow(method, "POST")
            body = await _body(receive)
            if path == "/v1/chat/completions":
                chat = parse(body, ChatRequest)
                await _answer(receive, response, chat.streaming, lambda e: service.chat(chat, e))
            else:
                text = parse(body, CompletionRequest)
                await _answer(
                    receive, response, text.streaming, lambda e: service.completion(text, e)
                )
        else:
            raise ApiError(404, f"no route {method} {scope['path']}", code="unknown_url")


async def _answer(
    receive: Receive,
    response: Response,
    stream: bool,
    work: Callable[[Any], Awaitable[dict[str, Any] | None]],
) -> None:
    """Run `work` (with an emitter when streaming) until it ends or the client goes."""
    result: dict[str, Any] | None = None
    failure: ApiError | SymphonyError | None = None
    gone = completed = False
    async with trio.open_nursery() as nursery:
        response.work = nursery.cancel_scope  # a stalled stream or a stop cancels it
        if response.stopped:
            nursery.cancel_scope.cancel()

        async def watch() -> None:  # the body is read: the next message is a disconnect
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            log.info("client went away: its request is cancelled")
            gone = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            result = await work(response.event if stream else None)
            completed = True
        except (ApiError, SymphonyError) as exc:  # raised past the nursery, not in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if gone or response.stalled:
        return  # nobody to answer, or nobody reading
    if response.stopped and not completed and failure is None:
        failure = ApiError(503, "the server is stopping", code="overloaded")
    if failure is not None:
        if not response.started:
            raise failure
        error = failure if isinstance(failure, ApiError) else from_symphony(failure)
        await response.event(error.body())  # mid-stream: an error event, then [DONE]
    if stream:
        await response.done()
    elif result is not None:
        await response.json(200, result)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise ApiError(405, f"{method} is not allowed here; use {allowed}")


async def _body(receive: Receive) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client went away before its body was whole")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    socket: str | None = None,
    max_requests: int = 32,
    queue_seconds: float = 30.0,
    stall_seconds: float = 60.0,
    stop: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on HOST:PORT through one connection to the Symphony server, until
    `stop` is set (then every request's work is cancelled and answered 503, and the
    server ends once they are) or cancelled; `task_status` gets the addresses it
    listens on."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as serve_asgi

    async with connect(socket) as lip:
        service = Service(lip, max_requests, queue_seconds)
        await lip.mkdir(service.folder, mode=0o700, parents=True)
        await sweep(lip, service.folder)  # the files of a server killed mid-request
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = log
        app = App(service, api_key, stall_seconds)

        async def shutdown() -> None:
            await (trio.Event() if stop is None else stop).wait()
            app.stop()

        await serve_asgi(
            app,  # type: ignore[arg-type]
            config,
            shutdown_trigger=shutdown,
            task_status=task_status,
            mode="asgi",
        )
