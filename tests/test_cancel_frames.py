"""Cancel frames: {"cancel": id} sets the request's `call.cancelled`, takes no slot, and
is ignored for unknown ids; both clients send it when a call is left early.

The handlers here are tiny stand-ins put into sched.calls.HANDLERS, so the tests hold
whatever the engine-backed calls do with a cancel.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import trio

from symphony.lipctl import aio
from symphony.lipctl.client import connect
from symphony.sched import calls
from symphony.sched.protocol import FrameBuffer, encode
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread


class Sleepy:
    """A handler that streams "ready", then waits for its cancel and answers "cancelled";
    `seen` says it was cancelled (from the server's thread)."""

    def __init__(self) -> None:
        self.seen = threading.Event()
        self.started = threading.Event()

    async def __call__(self, sys: Any, call: calls.Call, args: dict[str, Any]) -> Any:
        self.started.set()
        await call.stream("ready")
        await call.cancelled.wait()
        self.seen.set()
        return "cancelled"


class FakeGenerate:
    """A `generate` that streams a piece a millisecond until cancelled or max_tokens,
    then answers what it made."""

    def __init__(self) -> None:
        self.seen = threading.Event()  # it answered
        self.cancelled = False  # because it was cancelled

    async def __call__(self, sys: Any, call: calls.Call, args: dict[str, Any]) -> Any:
        ids: list[int] = []
        while not call.cancelled.is_set() and len(ids) < args.max_tokens:
            ids.append(len(ids))
            await call.stream({"text": "x", "token_ids": [ids[-1]]})
            with trio.move_on_after(0.001):
                await call.cancelled.wait()
        self.cancelled = call.cancelled.is_set()
        self.seen.set()
        usage = {"prompt_tokens": 1, "cached_tokens": 0, "completion_tokens": len(ids)}
        return {
            "text": "x" * len(ids),
            "token_ids": ids,
            "finish_reason": "cancelled" if call.cancelled.is_set() else "length",
            "tokens": 1 + len(ids),
            "usage": usage,
        }


@pytest.fixture
def sleepy(monkeypatch: pytest.MonkeyPatch) -> Sleepy:
    handler = Sleepy()
    monkeypatch.setitem(calls.HANDLERS, "test_sleepy", handler)
    return handler


@pytest.fixture
def fake_generate(monkeypatch: pytest.MonkeyPatch) -> FakeGenerate:
    handler = FakeGenerate()
    monkeypatch.setitem(calls.HANDLERS, "generate", handler)
    return handler


def raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


class Reader:
    """Frames from a raw socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = FrameBuffer()
        self.frames: list[dict[str, Any]] = []

    def next(self) -> dict[str, Any]:
        while not self.frames:
            data = self.sock.recv(65536)
            assert data, "the server closed the connection"
            self.buffer.feed(data)
            self.frames += self.buffer.frames()
        return self.frames.pop(0)


def request(rid: int, call: str, **args: object) -> bytes:
    return encode({"id": rid, "call": call, "args": args})


def test_cancel_frames_for_unknown_ids_are_ignored(tiny_server):
    sock = raw(tiny_server.server.config.socket_path)
    junk = [{"cancel": 12345}, {"cancel": "x"}, {"cancel": None}, {"cancel": True}]
    sock.sendall(b"".join(encode(j) for j in junk) + request(1, "tokenize", text="hi"))
    reader = Reader(sock)
    reply = reader.next()  # no reply to the cancel frames: the first is the request's
    assert (reply["id"], reply["ok"]) == (1, True)
    sock.sendall(encode({"cancel": 1}) + request(2, "hello"))  # 1 is finished: ignored
    assert reader.next()["id"] == 2
    sock.close()


def test_a_cancel_frame_cancels_its_request_even_with_every_slot_busy(tmp_path, sleepy):
    """max_in_flight=1 and the one slot waiting on its cancel: the cancel frame still gets
    read, then the queued request runs."""
    engine = make_tiny_engine(num_pages=32, page_size=4)
    thread = ServerThread(engine, str(tmp_path / "s.sock"), max_in_flight=1).start()
    try:
        sock = raw(thread.server.config.socket_path)
        reader = Reader(sock)
        sock.sendall(request(1, "test_sleepy") + request(2, "tokenize", text="hi"))
        assert reader.next() == {"id": 1, "stream": "ready"}
        sock.sendall(encode({"cancel": 1}))
        assert reader.next() == {"id": 1, "ok": True, "result": "cancelled"}
        assert sleepy.seen.is_set()
        assert (reader.next()["id"], sleepy.seen.is_set()) == (2, True)
        sock.close()
    finally:
        thread.stop()


def test_a_flood_of_cancel_frames_does_not_stall_other_calls(tiny_server, sleepy):
    path = tiny_server.server.config.socket_path
    flood = raw(path)
    reader = Reader(flood)
    flood.sendall(request(1, "test_sleepy"))
    assert reader.next()["stream"] == "ready"
    frames = b"".join(encode({"cancel": 10_000 + i}) for i in range(10_000))
    sender = threading.Thread(target=flood.sendall, args=(frames + request(2, "hello"),))
    begun = time.monotonic()
    sender.start()
    with connect(path) as other:  # another connection meanwhile
        for _ in range(5):
            assert other.tokenize("abc")
    assert reader.next()["id"] == 2  # the request behind the flood, answered
    sender.join(10)
    assert time.monotonic() - begun < 10
    assert not sleepy.seen.is_set()  # none of the flood named request 1
    flood.sendall(encode({"cancel": 1}))
    assert reader.next()["result"] == "cancelled"
    flood.close()


def test_an_id_in_flight_is_refused_then_free_again_once_answered(tiny_server, sleepy):
    sock = raw(tiny_server.server.config.socket_path)
    reader = Reader(sock)
    sock.sendall(request(7, "test_sleepy"))
    assert reader.next()["stream"] == "ready"
    sock.sendall(request(7, "hello"))
    refused = reader.next()
    assert (refused["id"], refused["ok"], refused["errno"]) == (7, False, "EINVAL")
    assert "in flight" in refused["message"]
    sock.sendall(encode({"cancel": 7}))
    assert reader.next()["result"] == "cancelled"
    sock.sendall(request(7, "hello"))  # answered: the id may be used again
    assert reader.next()["result"]["protocol"] == 2
    sock.close()


def test_closing_the_connection_still_cancels_its_requests(tiny_server, monkeypatch):
    ended = threading.Event()

    async def forever(sys: Any, call: calls.Call, args: dict[str, Any]) -> Any:
        try:
            await call.stream("ready")
            await trio.sleep_forever()
        finally:
            ended.set()

    monkeypatch.setitem(calls.HANDLERS, "test_forever", forever)
    sock = raw(tiny_server.server.config.socket_path)
    sock.sendall(request(1, "test_forever"))
    assert Reader(sock).next()["stream"] == "ready"
    sock.close()
    assert ended.wait(10)


def test_the_blocking_client_cancels_a_stream_it_closes(tiny_server, sleepy):
    with connect(tiny_server.server.config.socket_path) as lip:
        it = lip.stream_call("test_sleepy")
        assert next(it) == "ready"
        it.close()  # sends the cancel frame
        assert sleepy.seen.wait(10)
        assert lip.tokenize("abc")  # the cancelled call's late reply is skipped


def test_breaking_out_of_generate_stream_cancels_the_generate(tiny_server, fake_generate):
    with connect(tiny_server.server.config.socket_path) as lip:
        kv = lip.kv("g.kv", create=True)
        pieces = []
        for piece in kv.generate_stream(max_tokens=5000):
            pieces.append(piece)
            if len(pieces) == 3:
                break  # the generator is collected here, and closed
        assert fake_generate.seen.wait(10) and fake_generate.cancelled
        assert [p.token_ids for p in pieces] == [[0], [1], [2]]
        assert str(pieces[0]) == "x"
        assert lip.listdir("") == ["g.kv"]  # late pieces and the reply are skipped


def test_generate_stream_ends_with_its_result(tiny_server, fake_generate):
    with connect(tiny_server.server.config.socket_path) as lip:
        it = lip.kv("g.kv", create=True).generate_stream(max_tokens=5)
        assert next(it).text == "x"
        with pytest.raises(StopIteration) as stop:
            while True:
                next(it)
    result = stop.value.value
    assert (result.finish_reason, result.usage.completion_tokens) == ("length", 5)
    assert (str(result), result.token_ids) == ("xxxxx", [0, 1, 2, 3, 4])


async def test_the_trio_client_cancels_a_call_whose_scope_is_left(tiny_server, sleepy):
    async with aio.connect(tiny_server.server.config.socket_path) as lip:
        with trio.move_on_after(0.2) as scope:
            await lip.call("test_sleepy")
        assert scope.cancelled_caught
        assert await trio.to_thread.run_sync(sleepy.seen.wait, 10)
        assert await lip.tokenize("abc")


async def test_the_trio_generate_stream_left_early_is_cancelled(tiny_server, fake_generate):
    async with aio.connect(tiny_server.server.config.socket_path) as lip:
        kv = await lip.kv("g.kv", create=True)
        async with kv.generate_stream(max_tokens=5000) as stream:
            async for piece in stream:
                assert piece.token_ids == [0]
                break
        assert await trio.to_thread.run_sync(fake_generate.seen.wait, 10)
        assert fake_generate.cancelled
        with pytest.raises(RuntimeError):
            stream.result  # noqa: B018 (the property raises)
        assert await lip.listdir("") == ["g.kv"]


async def test_the_trio_wait_stream_and_its_result(tiny_server, monkeypatch):
    async def two_lines(sys: Any, call: calls.Call, args: dict[str, Any]) -> Any:
        await call.stream({"fd": 1, "data": b"a\n"})
        await call.stream({"fd": 1, "data": b"b\n"})
        return {"pid": args.pid, "exit_status": 0}

    monkeypatch.setitem(calls.HANDLERS, "wait", two_lines)
    async with aio.connect(tiny_server.server.config.socket_path) as lip:
        async with lip.wait(42) as stream:
            out = [item["data"] async for item in stream]
        assert (out, stream.result["exit_status"]) == ([b"a\n", b"b\n"], 0)
