"""No single client freezes or floods the syscall server: bounded frames, requests in
flight, connections per uid, work off the loop; half-closed clients still get answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from symphony.lipctl import SymphonyError, connect
from symphony.sched import server as server_module
from symphony.sched.protocol import HEADER, MAX_ARRAY, FrameBuffer, encode
from symphony.sched.schema import MAX_TEXT
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread
from tests.spawn_helpers import reachable_by_others


def raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def replies(sock: socket.socket, n: int) -> list[dict]:
    frames, out = FrameBuffer(), []
    while len(out) < n:
        data = sock.recv(65536)
        if not data:
            break
        frames.feed(data)
        out += frames.frames()
    return out


def request(rid: int, call: str, **args: object) -> bytes:
    return encode({"id": rid, "call": call, "args": args})


def test_a_half_closed_connection_gets_its_replies(tiny_server):
    sock = raw(tiny_server.server.config.socket_path)
    sock.sendall(request(1, "hello") + request(2, "tokenize", text="hello"))
    sock.shutdown(socket.SHUT_WR)
    got = replies(sock, 2)
    assert sorted(r["id"] for r in got) == [1, 2] and all(r["ok"] for r in got)
    sock.close()


def test_a_half_sent_frame_times_out(tiny_server, monkeypatch):
    monkeypatch.setattr(server_module, "FRAME_SECONDS", 0.3)
    sock = raw(tiny_server.server.config.socket_path)
    sock.sendall(HEADER.pack(1000) + b"\x80" * 10)  # 10 of 1,000 bytes, then silence
    t0 = time.monotonic()
    (reply,) = replies(sock, 1)
    assert reply["errno"] == "ETIMEDOUT"
    assert sock.recv(10) == b""  # and the connection is closed
    assert time.monotonic() - t0 < 5
    with connect(tiny_server.server.config.socket_path) as lip:  # others are served
        assert lip.info["protocol"] == 2


def test_oversized_arrays_and_texts_are_refused(tiny_server):
    path = tiny_server.server.config.socket_path
    sock = raw(path)
    body = msgpack.packb({"id": 1, "call": "detokenize", "args": {"ids": [1] * (MAX_ARRAY + 1)}})
    sock.sendall(HEADER.pack(len(body)) + body)
    (reply,) = replies(sock, 1)
    assert reply["errno"] == "EPROTO"
    with connect(path) as lip:
        with pytest.raises(SymphonyError) as info:
            lip.tokenize("a" * (MAX_TEXT + 1))
        assert info.value.errno == "E2BIG"
        with pytest.raises(SymphonyError) as info:
            lip.call("detokenize", ids=[1, True])
        assert info.value.errno == "EINVAL"


def test_a_connection_runs_a_bounded_number_of_requests(tmp_path):
    """Past max_in_flight the server stops reading: the other requests wait in the socket,
    not in the server's memory or its scheduler."""
    engine = make_tiny_engine(num_pages=128, page_size=4)
    thread = ServerThread(engine, str(tmp_path / "s.sock"), max_in_flight=2).start()
    try:
        path = thread.server.config.socket_path
        with connect(path) as lip:
            for i in range(6):
                lip.kv(f"f{i}.kv", create=True).append([1, 2, 3])
        flood = raw(path)
        for i in range(6):
            flood.sendall(
                request(i, "generate", path=f"f{i}.kv", max_tokens=200, sampler={"temperature": 0})
            )
        seen = 0
        with connect(path) as lip:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = max(seen, lip.status()["waiting"])
                if seen == 2:
                    break
            for _ in range(20):
                assert lip.status()["waiting"] <= 2
        assert seen == 2
        assert len(replies(flood, 6)) == 6  # all answered in the end
        flood.close()
        thread.run_sync(thread.server.store.check_invariants)
    finally:
        thread.stop()


@contextlib.contextmanager
def server_for_others(**config: object) -> Iterator[ServerThread]:
    """A tiny-model server whose socket sits in a folder other uids may search."""
    folder = tempfile.mkdtemp(prefix="symphony-test-")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "s.sock")
    thread = ServerThread(make_tiny_engine(num_pages=64, page_size=4), path, **config).start()
    try:
        yield thread
    finally:
        thread.stop()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


def as_nobody(code: str, *args: str) -> str:
    """Run Python `code` as uid 65534 (the checkout reachable); its stdout."""
    with reachable_by_others():
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


CONNECTIONS_PROBE = """
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks, refused = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    socks.append(s)
for s in socks:  # a refused connection gets one EAGAIN frame, then end of file
    s.settimeout(0.5)
    try:
        data = s.recv(4096)
    except socket.timeout:
        continue
    refused += b"EAGAIN" in data
print(refused)
"""


def test_connections_per_uid_are_bounded_but_not_roots():
    with server_for_others(max_connections=5) as thread:
        path = thread.server.config.socket_path
        assert as_nobody(CONNECTIONS_PROBE, path, "8") == "3"  # 5 kept, 3 refused
        socks = [raw(path) for _ in range(8)]  # root is not bounded
        with connect(path) as lip:
            assert lip.info["uid"] == 0
        for s in socks:
            s.close()


SHARE_PROBE = """
import sys
from symphony.lipctl import SymphonyError, connect
with connect(sys.argv[1]) as lip:
    kv = lip.kv("mine.kv", create=True)
    try:
        for _ in range(40):
            kv.append([5, 6, 7, 8])
        print("no limit")
    except SymphonyError as exc:
        print(exc.errno, kv.stat()["pages"])
"""


def test_a_uid_gets_its_share_of_the_pool_and_root_the_rest():
    with server_for_others(uid_pages=10) as thread:
        path = thread.server.config.socket_path
        assert as_nobody(SHARE_PROBE, path).split() == ["ENOSPC", "10"]
        with connect(path) as lip:  # root is not bounded by a share
            kv = lip.kv("root.kv", create=True)
            for _ in range(20):
                kv.append([9, 10, 11, 12])
            assert kv.stat()["pages"] == 20
        thread.run_sync(thread.server.store.check_invariants)


IN_FLIGHT_PROBE = """
import socket, sys, time
from symphony.lipctl import connect
from symphony.sched.protocol import encode
path, junk = sys.argv[1], "j" * int(sys.argv[2])  # bytes of a stop string never met
with connect(path) as lip:
    for i in range(6):
        lip.kv(f"g{i}.kv", create=True).append([1, 2, 3])
socks = []
for c in range(2):  # two connections, three long generates each
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    for i in range(3):
        args = {"path": f"g{3 * c + i}.kv", "max_tokens": 400, "sampler": {"temperature": 0}}
        if junk:
            args["stop"] = [junk]
        s.sendall(encode({"id": i, "call": "generate", "args": args}))
    socks.append(s)
print("sent", flush=True)
time.sleep(4)
"""


@pytest.mark.parametrize(
    "budget, junk", [(2, 0), (8, 900_000)], ids=["two requests", "8 units, 0.9 MB requests"]
)
def test_requests_in_flight_are_bounded_per_uid_over_its_connections(budget, junk):
    """Counted once per 256 KiB of their frames: 0.9 MB requests take 4 of 8 units."""
    with server_for_others(max_uid_in_flight=budget) as thread:
        path = thread.server.config.socket_path
        with reachable_by_others():
            probe = subprocess.Popen(
                [sys.executable, "-c", IN_FLIGHT_PROBE, path, str(junk)],
                user=65534,
                group=65534,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            try:
                assert probe.stdout is not None and probe.stdout.readline() == "sent\n"
                seen: list[int] = []
                # a loaded machine may take seconds to read the 0.9 MB frames
                deadline = time.monotonic() + 3.0
                with connect(path) as lip:
                    while time.monotonic() < deadline:
                        seen.append(lip.status()["waiting"])
                        if seen[-1] == 2 and seen.count(2) == 1:  # the bound: 0.4 s more
                            deadline = time.monotonic() + 0.4
                        time.sleep(0.02)
                assert max(seen) == 2
            finally:
                probe.kill()
                probe.wait(30)
