"""The syscall server over a real socket, on the tiny engine."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest

from symphony.engine.generate import generate
from symphony.lipctl import SymphonyError, connect
from symphony.sched.protocol import FrameBuffer, encode
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread


@pytest.fixture
def server(tmp_path):
    engine = make_tiny_engine(num_pages=64, page_size=4)
    thread = ServerThread(engine, str(tmp_path / "s.sock")).start()
    yield thread
    thread.stop()
    assert thread.error is None


def invariants(server: ServerThread) -> dict:
    server.run_sync(server.server.store.check_invariants)
    return server.run_sync(server.server.store.status)


def test_calls_and_errors(server):
    with connect(server.server.config.socket_path) as lip:
        assert lip.info["model"]["vocab_size"] == 259
        ids = lip.tokenize("hello")
        assert lip.detokenize(ids) == "hello"
        kv = lip.kv("a.kv", create=True)
        assert kv.append(ids) == 5
        st = kv.stat()
        assert (st["tokens"], st["pages"], st["mode"] & 0o777) == (5, 2, 0o600)
        b = kv.fork("b.kv")
        assert b.stat()["shared_pages"] == 2
        out = b.forward([7], temperature=0.0, outputs=[{"sample": True, "top_k": 3}])
        (top,) = out.outputs
        assert out.tokens == 6 and len(top.top_k) == 3
        assert out.token == top.top_k[0][0]  # greedy takes the likeliest
        b.truncate(2)
        assert b.stat()["tokens"] == 2
        for call, errno_name in [
            (lambda: lip.kv("missing.kv"), "ENOENT"),
            (lambda: lip.kv("a.kv", create=True, exclusive=True), "EEXIST"),
            (lambda: kv.forward([10**6]), "EINVAL"),
            (lambda: kv.truncate(99), "EINVAL"),
            (lambda: lip.call("no_such_call"), "ENOSYS"),
            (lambda: lip.call("forward", path="a.kv", tokens="abc"), "EINVAL"),
            (lambda: kv.forward([1], temperature=-1), "EINVAL"),
        ]:
            with pytest.raises(SymphonyError) as info:
                call()
            assert info.value.errno == errno_name
        kv.unlink()
        b.unlink()
    assert invariants(server)["pages"]["used"] == 0


def test_generate_matches_the_engine_alone(server):
    engine = server.server.engine
    with connect(server.server.config.socket_path) as lip:
        prompt = lip.tokenize("once upon")
        kv = lip.kv("g.kv", create=True)
        kv.append(prompt)
        result = lip.call("generate", path="g.kv", max_tokens=12, sampler={"temperature": 0})
    expected = server.run_sync(lambda: generate(engine, [prompt], 12)[0])
    stops = engine.tokenizer.stop_token_ids
    expected = expected[: next((i + 1 for i, t in enumerate(expected) if t in stops), None)]
    assert result["token_ids"] == expected
    assert result["tokens"] == len(prompt) + len(expected)  # every token was appended
    invariants(server)


def test_streaming_and_stop_strings(server):
    with connect(server.server.config.socket_path) as lip:
        kv = lip.kv("s.kv", create=True)
        kv.append(lip.tokenize("abc"))
        it = kv.generate_stream(max_tokens=20, temperature=0.0)
        pieces = []
        while True:
            try:
                pieces.append(next(it))
            except StopIteration as stop:
                result = stop.value
                break
        assert "".join(p.text for p in pieces) == result.text
        assert [t for p in pieces for t in p.token_ids] == result.token_ids
        kv.truncate(3)
        full = kv.generate(max_tokens=20, temperature=0.0).text
        kv.truncate(3)
        if len(full) > 3:
            cut = full[2:4]
            text = kv.generate(max_tokens=20, temperature=0.0, stop=[cut]).text
            assert text == full[: full.index(cut)]
    invariants(server)


def raw_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    return s


def read_replies(s: socket.socket) -> list[dict]:
    frames, out = FrameBuffer(), []
    while True:
        try:
            data = s.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        frames.feed(data)
        out += frames.frames()
    return out


def test_malformed_frames_get_an_error_or_a_closed_connection(server):
    path = server.server.config.socket_path
    cases = [
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", ["EPROTO"]),  # not msgpack
        (struct.pack(">I", 1 << 30), ["EPROTO"]),  # oversized
        (encode({"no": "id"})[:3], []),  # cut short, then closed
        (struct.pack(">I", 2) + msgpack.packb([1]), ["EPROTO"]),  # not a map
    ]
    for payload, expected in cases:
        s = raw_socket(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        replies = read_replies(s)
        s.close()
        assert [r["errno"] for r in replies] == expected
    s = raw_socket(path)
    s.sendall(encode({"id": "x", "call": "hello"}) + encode({"id": 3, "call": 5, "args": []}))
    s.sendall(encode({"id": 4, "call": "kv_open", "args": {"path": 7}}))
    s.settimeout(2)
    replies = {r["id"]: r for r in read_replies(s)}
    assert replies[None]["errno"] == "EINVAL"
    assert replies[3]["errno"] == "ENOSYS"
    assert replies[4]["errno"] == "EINVAL"
    s.close()
    with connect(path) as lip:
        assert lip.call("hello")["protocol"] == 2  # still serving
    invariants(server)


def test_a_client_gone_mid_generate_leaves_no_page(server):
    path = server.server.config.socket_path
    with connect(path) as lip:
        kv = lip.kv("d.kv", create=True)
        kv.append(lip.tokenize("drop me"))
    s = raw_socket(path)
    s.sendall(
        encode(
            {
                "id": 1,
                "call": "generate",
                "args": {
                    "path": "d.kv",
                    "max_tokens": 2000,
                    "stream": True,
                    "sampler": {"temperature": 1.0, "seed": 1},
                },
            }
        )
    )
    s.recv(100)  # the first streamed piece: it is running
    s.close()
    import time

    deadline = time.monotonic() + 20
    while (
        server.run_sync(lambda: server.server.scheduler.num_waiting) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    status = invariants(server)
    with connect(path) as lip:
        tokens = lip.kv("d.kv").stat()["tokens"]
        prompt = len(lip.tokenize("drop me"))
        lip.kv("d.kv").unlink()
    assert prompt < tokens < prompt + 2000  # nothing of the prompt lost, nothing half-made
    assert invariants(server)["pages"]["used"] == 0
    assert status["pages"]["used"] > 0  # the file kept what was generated before the drop


def test_a_client_that_leaves_before_its_reply_does_not_stop_the_server(server):
    path = server.server.config.socket_path
    for _ in range(5):
        s = raw_socket(path)
        s.sendall(encode({"id": 1, "call": "tokenize", "args": {"text": "x" * 5000}}))
        s.close()  # the reply finds a reset connection
    s = raw_socket(path)
    s.sendall(struct.pack(">I", 4) + b"\x81\x91\x01\x01")  # a map with a list key
    s.shutdown(socket.SHUT_WR)
    assert [r["errno"] for r in read_replies(s)] == ["EPROTO"]
    with connect(path) as lip:
        assert lip.call("hello")["protocol"] == 2
    invariants(server)


def test_unlinking_a_file_mid_generate_keeps_its_context(server):
    path = server.server.config.socket_path
    with connect(path) as lip, connect(path) as other:
        kv = lip.kv("u.kv", create=True)
        prompt = lip.tokenize("unlink me")
        kv.append(prompt)
        it = kv.generate_stream(max_tokens=30, temperature=0.0, blocked=[256, 257, 258])
        next(it)
        other.kv("u.kv").unlink()
        while True:
            try:
                next(it)
            except StopIteration as stop:
                result = stop.value
                break
    assert result.tokens == len(prompt) + 30
    assert invariants(server)["pages"]["used"] == 0


def test_generate_stops_at_the_context_limit_with_its_text(tmp_path):
    from symphony.engine.config import EngineConfig
    from symphony.engine.engine import Engine
    from tests.tiny import tiny_model_files

    engine = Engine(
        tiny_model_files(max_position=24), EngineConfig(device="cpu", num_pages=16, page_size=4)
    )
    thread = ServerThread(engine, str(tmp_path / "c.sock")).start()
    try:
        with connect(thread.server.config.socket_path) as lip:
            kv = lip.kv("c.kv", create=True)
            kv.append(list(range(10, 30)))
            result = lip.call(
                "generate",
                path="c.kv",
                max_tokens=10,
                sampler={"temperature": 0, "blocked": [256, 257, 258]},
            )
            assert result["finish_reason"] == "length"
            assert result["tokens"] == 24 == kv.stat()["tokens"]
            full = lip.call("generate", path="c.kv", max_tokens=1)
            assert (full["finish_reason"], full["token_ids"], full["tokens"]) == ("length", [], 24)
            empty = lip.kv("e.kv", create=True)
            with pytest.raises(SymphonyError) as info:
                empty.generate(max_tokens=3)
            assert info.value.errno == "EINVAL"
        invariants(thread)
    finally:
        thread.stop()
