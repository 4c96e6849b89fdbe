"""Issue 4's walkthrough on the real model: `lipctl serve` mounts /kv by default; a LIP
makes a context; ls, cp, du, setfattr, /.sys/status and `lipctl run` work on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from symphony.lipctl import connect
from tests.mount_helpers import answers, needs_fuse, sh, status
from tests.server_helpers import ROOT

KV = "/kv"
pytestmark = [
    pytest.mark.slow,
    needs_fuse,
    pytest.mark.skipif(os.path.ismount(KV), reason="/kv is in use by another mount"),
]
LIPCTL = [sys.executable, "-m", "symphony.lipctl.cli"]

MAKE_CONTEXT = textwrap.dedent(
    """
    from symphony.lipctl import connect
    with connect() as lip:
        lip.mkdir("walk", parents=True)
        kv = lip.kv("walk/ctx.kv", create=True)
        kv.append(lip.apply_chat_template([{"role": "user", "content": "Name a color."}]))
        print(kv.stat()["tokens"])
    """
)


def test_serve_mounts_kv_and_the_shell_walkthrough_works(tmp_path):
    folder = tempfile.mkdtemp(prefix="symphony-walk-")
    os.chmod(folder, 0o755)
    socket = os.path.join(folder, "s.sock")
    env = {**os.environ, "SYMPHONY_SOCKET": socket}
    server = subprocess.Popen(
        [*LIPCTL, "serve", "--pages", "512"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (os.path.ismount(KV) and answers(socket)):
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "no server at /kv"
            time.sleep(0.1)
        program = tmp_path / "make_context.py"
        program.write_text(MAKE_CONTEXT)
        made = subprocess.run(
            [*LIPCTL, "run", str(program)], env=env, capture_output=True, text=True
        )
        assert made.returncode == 0, made.stderr
        question = int(made.stdout)
        ctx, copy = f"{KV}/walk/ctx.kv", f"{KV}/walk/copy.kv"
        assert "ctx.kv" in sh("ls", "-l", f"{KV}/walk").stdout
        assert sh("cp", ctx, copy).returncode == 0
        assert sh("du", ctx, copy).stdout.split()[::2] == ["0", "0"]  # every page shared
        assert sh("setfattr", "-n", "user.kv.tokens", "-v", str(question - 3), copy).returncode == 0
        assert status(KV)["invariants"] == "ok"
        go_on = [*LIPCTL, "run", str(ROOT / "examples" / "continue.py"), "walk/copy.kv", "6"]
        out = subprocess.run(go_on, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"{question - 3} -> {question + 3} tokens" in out.stdout
        with connect(socket) as lip:
            assert lip.kv("walk/ctx.kv").stat()["tokens"] == question  # the original is intact
            lip.kv("walk/ctx.kv").unlink()
            lip.kv("walk/copy.kv").unlink()
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0 and "symphony: stopped" in err, err
    assert not os.path.ismount(KV)
