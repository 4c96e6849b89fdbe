"""A tiny-model server mounted for real (FUSE) in a subprocess, for the mount tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from symphony.lipctl import SymphonyError, connect
from tests.server_helpers import ROOT

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs /dev/fuse and fusermount3",
)
NOBODY = 65534


def sh(*argv: str, user: int | None = None) -> subprocess.CompletedProcess:
    if user is not None:
        argv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def start(folder: str, state: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """A tiny-model server mounted at folder/kv, once the mount is there and it answers."""
    mount, socket = os.path.join(folder, "kv"), os.path.join(folder, "s.sock")
    with contextlib.suppress(FileExistsError):  # also when a killed server left it stale
        os.mkdir(mount)
    argv = [sys.executable, "-m", "tests.serve_tiny", socket, mount, *([state] if state else [])]
    # its output goes to a file: a pipe nobody reads would block a server that logs much
    log = os.path.join(folder, "server.log")
    with open(log, "a") as out:
        server = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (os.path.ismount(mount) and answers(socket)):
        if server.poll() is not None:
            with open(log) as f:
                raise AssertionError(f.read() or "server exited")
        assert time.monotonic() < deadline, "the mount did not appear"
        time.sleep(0.05)
    return server, mount, socket


def answers(socket: str) -> bool:
    try:
        connect(socket).close()
        return True
    except SymphonyError:
        return False


def stop(server: subprocess.Popen, mount: str, kill: bool = False) -> None:
    if kill:
        server.kill()
    else:
        server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(20)
    if not kill:
        if os.path.ismount(mount):
            subprocess.run(["fusermount3", "-u", mount], timeout=20, check=False)
        # lazily, whatever is left: a busy or a stale (ENOTCONN) mount
        subprocess.run(
            ["fusermount3", "-u", "-z", mount], timeout=20, check=False, capture_output=True
        )


def mounted_server():
    folder = tempfile.mkdtemp(prefix="symphony-mount-")
    os.chmod(folder, 0o755)
    server, mount, socket = start(folder)
    try:
        yield mount, socket
    finally:
        stop(server, mount)
        shutil.rmtree(folder, ignore_errors=True)


def status(mount: str) -> dict[str, str]:
    with open(os.path.join(mount, ".sys", "status")) as f:
        pairs = dict(line.split(" ", 1) for line in f.read().splitlines())
    pages = [int(pairs[f"pages_{k}"]) for k in ("used", "cached", "free")]
    assert sum(pages) == int(pairs["pages_total"])
    return pairs


class StatefulServer:
    """A tiny-model server with --state, to stop (or SIGKILL) and start again."""

    def __init__(self, state: str) -> None:
        self.folder = tempfile.mkdtemp(prefix="symphony-state-")
        self.state = state
        self.start()

    def start(self) -> None:
        self.server, self.mount, self.socket = start(self.folder, self.state)

    def stop(self, kill: bool = False) -> None:
        stop(self.server, self.mount, kill)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
