"""The OpenAI LIP in the tests: started as `lipctl run` would, on a tiny-model server,
and the `openai` client on it (the fixtures `served`, `client`, `model` are in
tests/conftest.py)."""

from __future__ import annotations

import os
import socket as sockets
import subprocess
import sys
import time
from pathlib import Path

from tests.server_helpers import ROOT


def free_port() -> int:
    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_lip(socket_path: str, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The LIP as `lipctl run` would start it, its output in `log`, once it serves."""
    port = free_port()
    env = {**os.environ, "SYMPHONY_SOCKET": socket_path}
    argv = [sys.executable, str(ROOT / "examples" / "openai_server.py"), "--port", str(port)]
    with open(log, "w") as out:
        lip = subprocess.Popen([*argv, *extra], env=env, cwd=ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while "serving the OpenAI API" not in log.read_text():
        assert lip.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return lip, f"http://127.0.0.1:{port}/v1"


def stop_lip(lip: subprocess.Popen, log: Path) -> None:
    lip.terminate()
    lip.wait(20)
    assert "Traceback" not in log.read_text(), log.read_text()  # no request failed inside


HELLO = [{"role": "user", "content": "Say hello."}]
