"""Fuzz: malformed frames and arguments never crash the server and never leak a page."""

from __future__ import annotations

import contextlib
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symphony.lipctl import connect
from symphony.sched.calls import HANDLERS
from symphony.sched.protocol import FrameBuffer, encode
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)
# arguments drawn from the names the calls really take, with values of any type
arg_names = st.sampled_from(
    [
        "path",
        "src",
        "dst",
        "tokens",
        "n",
        "text",
        "ids",
        "messages",
        "sampler",
        "max_tokens",
        "stop",
        "create",
        "mode",
        "logprobs",
        "mask",
        "pid",
        "stream",
        "parents",
        "exclusive",
    ]
)
requests = st.fixed_dictionaries(
    {
        "id": st.integers(0, 2**31),
        "call": st.sampled_from(sorted(set(HANDLERS) - {"spawn", "wait"})) | st.text(max_size=6),
        "args": st.dictionaries(
            arg_names, values | st.sampled_from(["f.kv", "g.kv", "", "/"]), max_size=5
        ),
    }
)
garbage = st.binary(max_size=64)


def exchange(path: str, payload: bytes) -> list[dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(20)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    frames, out = FrameBuffer(), []
    while data := s.recv(65536):
        frames.feed(data)
        out += frames.frames()
    s.close()
    return out


def test_fuzzed_frames_never_crash_or_leak(tmp_path):
    engine = make_tiny_engine(num_pages=48, page_size=4)
    server = ServerThread(engine, str(tmp_path / "f.sock")).start()
    path = server.server.config.socket_path
    with connect(path) as lip:
        lip.kv("f.kv", create=True).append([1, 2, 3, 4, 5])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(requests, min_size=1, max_size=4), garbage)
    def run(reqs: list[dict], tail: bytes) -> None:
        payload = b"".join(encode(r) for r in reqs) + tail
        for reply in exchange(path, payload):
            assert reply.get("ok") in (True, False)
            if reply["ok"] is False:
                assert reply["errno"] != "EIO", reply  # every refusal is a named one
        server.run_sync(server.server.store.check_invariants)

    try:
        run()
        with connect(path) as lip:
            assert lip.call("hello")["protocol"] == 2
            for name in lip.listdir(""):
                with contextlib.suppress(Exception):
                    lip.call("kv_unlink", path=name)
        server.run_sync(server.server.store.check_invariants)
        status = server.run_sync(server.server.store.status)
        assert status["pages"]["used"] == 0
    finally:
        server.stop()
    assert server.error is None
