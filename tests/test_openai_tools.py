"""The OpenAI LIP's tool calls, and its limits: out of pages, out of turns."""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
import openai
import pytest

from symphony.lipctl import connect
from tests.conftest import make_tiny_engine
from tests.openai_helpers import HELLO, start_lip, stop_lip
from tests.server_helpers import ServerThread

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


def test_a_required_tool_call_is_parsed_into_tool_calls(client, model) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(
            model=model,
            messages=ask,
            tools=[WEATHER, CLOCK],
            tool_choice=choice,
            max_tokens=120,
            seed=1,
        )
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content is None
        (call,) = message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert isinstance(arguments["city"], str)
    # the call and its result go back in, and the chat goes on
    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model, messages=follow, max_tokens=8)
    assert r.choices[0].message.content is not None


def test_a_streamed_tool_call_carries_its_arguments(client, model) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=120,
            seed=2,
            stream=True,
        )
    )
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert calls and calls[0].function.name == "get_weather"
    assert "city" in json.loads("".join(tc.function.arguments or "" for tc in calls))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_out_of_pages_is_429_and_the_lip_goes_on(tmp_path) -> None:
    thread = ServerThread(make_tiny_engine(num_pages=24, page_size=4), str(tmp_path / "s.sock"))
    thread.start()
    log = tmp_path / "small.log"
    lip, url = start_lip(thread.server.config.socket_path, log)
    try:
        api = openai.OpenAI(base_url=url, api_key="-", max_retries=0)
        model = api.models.list().data[0].id
        long = [{"role": "user", "content": "word " * 60}]  # 300 tokens, 24 pages hold 96
        with pytest.raises(openai.RateLimitError) as info:
            api.chat.completions.create(model=model, messages=long, max_tokens=4)
        assert "pages" in str(info.value)
        with pytest.raises(openai.RateLimitError):  # a stream too: no headers before pages
            list(api.chat.completions.create(model=model, messages=long, max_tokens=4, stream=True))
        r = api.chat.completions.create(model=model, messages=HELLO[:1], max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
        with connect(thread.server.config.socket_path) as symphony:
            assert symphony.listdir("openai-0") == []
    finally:
        stop_lip(lip, log)
        thread.stop()


def test_a_request_that_waits_too_long_for_a_turn_is_503(served, tmp_path) -> None:
    thread, _ = served
    log = tmp_path / "one.log"
    lip, url = start_lip(
        thread.server.config.socket_path, log, "--max-requests", "1", "--queue-seconds", "0.3"
    )
    try:
        api = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60)
        model = api.models.list().data[0].id
        long = api.chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=1900,
            stream=True,
            temperature=1.0,
            logit_bias={"256": -100, "258": -100},  # no end token: it runs all 1,900
        )
        next(iter(long))  # it has the only turn, and does not read on: it keeps it
        with pytest.raises(openai.InternalServerError) as info:
            api.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "overloaded"
        long.close()
    finally:
        stop_lip(lip, log)


async def test_a_stream_whose_client_reads_nothing_is_cancelled(served) -> None:
    """A client that keeps its connection and reads nothing: hypercorn's socket writes
    are shielded, so the app's first body write blocks as one to a full socket does.
    The request is cancelled after stall_seconds and its files (pages) are gone."""
    import msgspec
    import trio

    from symphony.lipctl.aio import connect as connect_async
    from symphony.lipctl.openai_api.app import App
    from symphony.lipctl.openai_api.chat import Service

    thread, _ = served
    socket = thread.server.config.socket_path
    body = {"model": "m", "messages": HELLO, "max_tokens": 1500, "stream": True}
    unblocked = trio.Event()
    sent: list[dict] = []
    received = []

    async def receive() -> dict:
        if not received:
            received.append(body)
            return {"type": "http.request", "body": msgspec.json.encode(body)}
        await trio.sleep_forever()  # connected, never gone

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            with trio.CancelScope(shield=True):  # as hypercorn's send_all to a full socket
                await unblocked.wait()

    async with connect_async(socket) as lip:
        service = Service(lip)
        body["model"] = service.model
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(App(service, stall_seconds=0.5), scope, receive, send)
            try:
                with trio.fail_after(30):
                    while not await lip.listdir(service.folder):
                        await trio.sleep(0.01)  # the request's file is made
                    while await lip.listdir(service.folder):
                        await trio.sleep(0.05)  # and gone, though the client never read
                tokens = thread.server.scheduler.num_tokens
                await trio.sleep(0.5)
                assert thread.server.scheduler.num_tokens == tokens  # nothing generates
            finally:
                unblocked.set()  # the client reads at last: the handler ends
    assert sent[0]["status"] == 200


def test_a_stopped_server_removes_its_files_and_a_killed_ones_are_swept(served, tmp_path) -> None:
    thread, _ = served

    def files() -> list[str]:
        with connect(thread.server.config.socket_path) as symphony:
            return symphony.listdir("openai-0")

    def open_stream(url: str):
        api = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=60)
        stream = api.chat.completions.create(
            model=api.models.list().data[0].id,
            messages=HELLO,
            max_tokens=1900,
            stream=True,
            logit_bias={"256": -100, "258": -100},  # no end token: it runs on
        )
        next(iter(stream))
        return stream

    killed, url = start_lip(thread.server.config.socket_path, tmp_path / "killed.log")
    stream = open_stream(url)
    killed.kill()  # mid-request: its files stay, as files do
    killed.wait(20)
    stream.close()
    assert len(files()) == 1
    log = tmp_path / "stopped.log"
    stopped, url = start_lip(thread.server.config.socket_path, log)
    assert files() == []  # it swept the killed one's
    stream = open_stream(url)
    assert len(files()) == 1

    def read_on() -> None:  # a client reading its stream to the end the server gives it
        with contextlib.suppress(openai.APIError, httpx.HTTPError):
            for _ in stream:
                pass

    reader = threading.Thread(target=read_on)
    reader.start()
    stop_lip(stopped, log)  # SIGTERM, mid-request
    reader.join(10)
    assert stopped.returncode == 0  # a clean stop, not cut after STOP_SECONDS
    assert not reader.is_alive()  # the stream ended
    assert files() == []
