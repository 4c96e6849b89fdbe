"""Starting and stopping `lipctl serve` as a child process (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from symphony.lipctl.client import SymphonyError, connect


def start_server(
    socket: str, *extra: str, mount: str | None = None, timeout: float = 600, **popen: Any
) -> subprocess.Popen:
    """Run `lipctl serve --socket SOCKET (--mount MOUNT | --no-mount) EXTRA...`; return once
    it answers (and its mount is up).

    Raises:
        SymphonyError: ECHILD if it exits first, ETIMEDOUT after `timeout` seconds.
    """
    argv = [sys.executable, "-m", "symphony.lipctl.cli", "serve", "--socket", socket, *extra]
    argv += ["--mount", mount] if mount else ["--no-mount"]
    server = subprocess.Popen(argv, **popen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SymphonyError("ECHILD", f"the server exited with status {server.returncode}")
        try:
            connect(socket).close()
            if mount is None or os.path.ismount(mount):
                return server
        except SymphonyError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SymphonyError("ETIMEDOUT", "the server did not start in time")


def stop_server(server: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM (a clean stop), SIGKILL after `timeout`; returns its stderr if piped."""
    server.terminate()
    try:
        _, err = server.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
    return err or ""
