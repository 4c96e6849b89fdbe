"""KV edits and grammars from the shell: kv_drop frees what `du` and `lipctl status`
show, and /.sys/ctl speaks kv_drop, kv_concat and kv_constrain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from symphony.lipctl import connect
from tests.mount_helpers import needs_fuse, sh, status
from tests.server_helpers import ROOT
from tests.test_mount_sys import ctl

pytestmark = needs_fuse


def lipctl_status_used(socket: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "symphony.lipctl.cli", "status", "--socket", socket],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("pages"))
    return int(line.split(",")[1].split()[0])  # "pages  N total, U used (...)"


def du_blocks(path: str) -> int:
    out = sh("du", "-B1", path)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


def test_a_drop_frees_pages_that_du_and_lipctl_status_show(mounted):
    mount, socket = mounted
    path = os.path.join(mount, "long.kv")
    with connect(socket) as lip:
        lip.kv("long.kv", create=True).append(list(range(3, 3 + 64)))  # 16 pages of 4
    before, used = du_blocks(path), lipctl_status_used(socket)
    (reply,) = ctl(mount, "kv_drop long.kv 4 52 reposition")  # 48 tokens: 12 pages
    assert reply.startswith("ok "), reply
    stat = json.loads(reply.removeprefix("ok "))
    assert (stat["tokens"], stat["next_position"]) == (16, 16)  # contiguous again
    assert du_blocks(path) == before - 12 * (before // 16)
    assert lipctl_status_used(socket) == used - 12
    assert status(mount)["invariants"] == "ok"


def test_ctl_speaks_kv_concat_and_kv_constrain(mounted):
    mount, _ = mounted
    replies = ctl(
        mount,
        "kv_open a.kv create=true",
        "forward a.kv [72, 105]",
        "kv_open b.kv create=true",
        "forward b.kv [33, 33, 33]",
        "kv_concat ab.kv a.kv b.kv",
        'kv_constrain ab.kv {"regex": "[0-9]{3}"}',
        'generate ab.kv max_tokens=8 sampler={"temperature": 1.0, "seed": 1}',
        "kv_constrain ab.kv null",
        'kv_constrain ab.kv {"regex": "[0-9"}',
    )
    assert [r.split()[0] for r in replies] == ["ok"] * 8 + ["error"]
    assert json.loads(replies[4].removeprefix("ok "))["tokens"] == 5
    generated = json.loads(replies[6].removeprefix("ok "))
    assert generated["finish_reason"] == "stop" and generated["text"].isdigit()
    assert len(generated["text"]) == 3
    assert json.loads(replies[7].removeprefix("ok "))["grammar"] is None
    assert replies[8].startswith("error EINVAL bad grammar")
