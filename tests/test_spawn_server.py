"""LIPs through a real server: a child's connection counts for its LIP, and a server
killed with SIGKILL takes its LIPs along and leaves the next one nothing to find."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from symphony.lipctl import SymphonyError, connect
from tests.conftest import make_tiny_engine
from tests.server_helpers import ROOT, ServerThread
from tests.spawn_helpers import alive, gone_within

# two appends of 8 tokens under a quota of 12: prints EDQUOT where the quota holds
APPEND_PAST_QUOTA = textwrap.dedent(
    """
    with connect() as lip:
        kv = lip.kv(f"over-{os.getpid()}.kv", create=True)
        kv.append(list(range(100, 108)))
        try:
            kv.append(list(range(100, 108)))
            print("allowed", flush=True)
        except SymphonyError as exc:
            print(exc.errno, flush=True)
        kv.unlink()
    """
)
IMPORTS = "import os\nfrom symphony.lipctl import SymphonyError, connect\n"

CHILD_OVER_QUOTA = (
    IMPORTS
    + "pid = os.fork()\n"
    + "if pid == 0:\n"
    + "    os.setsid()  # out of the LIP's session, still in its tree\n"
    + textwrap.indent(APPEND_PAST_QUOTA, "    ")
    + "    os._exit(0)\n"
    + "os.waitpid(pid, 0)\n"
)

TREE = textwrap.dedent(
    """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            print("grandchild", os.getpid(), flush=True)
            time.sleep(120)
        os._exit(0)
    time.sleep(120)
    """
)


def run_to_end(lip, pid: int) -> tuple[bytes, int]:
    out, it = b"", lip.wait(pid)
    while True:
        try:
            item = next(it)
        except StopIteration as stop:
            return out, stop.value["exit_status"]
        out += item["data"]


def test_a_childs_connection_counts_against_its_lips_token_quota(tmp_path):
    engine = make_tiny_engine(num_pages=64, page_size=4)
    server = ServerThread(engine, str(tmp_path / "s.sock")).start()
    try:
        with connect(server.server.config.socket_path) as lip:
            pid = lip.spawn(CHILD_OVER_QUOTA, name="child.py", limits={"tokens": 12})
            assert run_to_end(lip, pid) == (b"EDQUOT\n", 0)
            row = next(p for p in lip.ps() if p["pid"] == pid)
            assert row["tokens"] == 8  # the child's first append, on the LIP's account
    finally:
        server.stop()
    assert server.error is None


def start_tiny(socket: str) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.serve_tiny", socket, ""],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline() == "ready\n"  # ends (empty) if the server dies
    return server


def first_line(lip, pid: int) -> str:
    out, it = b"", lip.wait(pid)
    deadline = time.monotonic() + 30
    while b"\n" not in out and time.monotonic() < deadline:
        out += next(it)["data"]
    return out.decode().split("\n")[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_sigkilled_servers_lips_die_and_the_next_server_ends_the_rest(tmp_path):
    socket = str(tmp_path / "s.sock")
    servers = [start_tiny(socket)]
    try:
        with connect(socket) as lip:
            pid = lip.spawn(TREE, name="tree.py")
            grandchild = int(first_line(lip, pid).split()[1])
        workdir = os.readlink(f"/proc/{pid}/cwd")
        assert os.path.basename(workdir).startswith("symphony-lip-")
        servers[0].send_signal(signal.SIGKILL)
        servers[0].wait(10)
        assert gone_within(pid)  # the parent-death signal
        servers.append(start_tiny(socket))
        assert not alive(grandchild)  # ended by the new server, from the registry
        assert not os.path.exists(workdir)
        assert not os.path.exists(socket + ".lips")
        with connect(socket) as lip:
            assert not any(p["spawned"] for p in lip.ps())
            with pytest.raises(SymphonyError):
                lip.kill(pid)
    finally:
        for server in servers:
            server.kill()
            server.wait(10)


def test_a_lip_that_connects_before_its_spawn_returns_is_still_that_lip(tmp_path, monkeypatch):
    """The LIP runs and connects while the server still waits on its launcher's status.

    Before: its connection got a row of its own (no quota), and when it closed, that
    row's removal took the LIP's row with it, so `wait` answered ESRCH.
    """
    from symphony.sched import spawner

    launch_status = spawner._launch_status

    async def slow_launch_status(*args):
        result = await launch_status(*args)
        await trio.sleep(3)  # the program runs, connects, appends and exits meanwhile
        return result

    monkeypatch.setattr(spawner, "_launch_status", slow_launch_status)
    engine = make_tiny_engine(num_pages=64, page_size=4)
    server = ServerThread(engine, str(tmp_path / "s.sock")).start()
    try:
        with connect(server.server.config.socket_path) as lip:
            pid = lip.spawn(IMPORTS + APPEND_PAST_QUOTA, name="quick.py", limits={"tokens": 12})
            assert run_to_end(lip, pid) == (b"EDQUOT\n", 0)  # its quota held from the start
            row = next(p for p in lip.ps() if p["pid"] == pid)
            assert row["name"] == "quick.py" and row["tokens"] == 8
    finally:
        server.stop()
    assert server.error is None
