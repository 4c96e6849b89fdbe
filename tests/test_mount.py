"""The store mounted for real (FUSE), driven by shell tools, beside the syscalls."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from symphony.lipctl import connect
from tests.mount_helpers import NOBODY, StatefulServer, needs_fuse, sh, status
from tests.server_helpers import ROOT

pytestmark = needs_fuse


def test_the_shell_scenario(mounted):
    mount, socket = mounted
    path = lambda *p: os.path.join(mount, *p)  # noqa: E731

    def step(*argv: str, user: int | None = None, ok: bool = True) -> str:
        """Run a shell command on the mount; then /.sys/status must hold its invariants."""
        out = sh(*argv, user=user)
        assert (out.returncode == 0) == ok, (argv, out.stderr)
        assert status(mount)["invariants"] == "ok", argv
        return out.stdout + out.stderr

    step("mkdir", path("ctx"))
    with connect(socket) as lip:
        lip.kv("ctx/a.kv", create=True).append(list(range(3, 21)))  # 18 tokens: 4 pages + 2
    used = status(mount)["pages_used"]
    step("cp", path("ctx/a.kv"), path("ctx/b.kv"))  # a fork: every page shared
    assert status(mount)["pages_used"] == used
    listing = step("ls", "-l", path("ctx"))
    assert "a.kv" in listing and "b.kv" in listing
    assert os.stat(path("ctx/a.kv")).st_size == os.stat(path("ctx/b.kv")).st_size > 0
    # du shows real memory: the fork shares every page, so neither owns a block
    assert step("du", path("ctx/a.kv"), path("ctx/b.kv")).split()[::2] == ["0", "0"]
    assert int(status(mount)["pages_shared"]) == 5
    assert '"5"' in step("getfattr", "-n", "user.kv.shared_pages", path("ctx/b.kv"))
    assert os.getxattr(path("ctx/b.kv"), "user.kv.tokens") == b"18"
    step("setfattr", "-n", "user.kv.tokens", "-v", "9", path("ctx/b.kv"))  # rollback
    with connect(socket) as lip:
        st = lip.kv("ctx/b.kv").stat()
        assert (st["tokens"], st["pages"]) == (9, 3)
        assert lip.kv("ctx/b.kv").forward([5], temperature=0).tokens == 10
    assert os.stat(path("ctx/b.kv")).st_blocks > 0  # it wrote into its own partial page
    step("mv", path("ctx/b.kv"), path("moved.kv"))
    step("ln", path("moved.kv"), path("hard.kv"))
    assert os.stat(path("hard.kv")).st_nlink == 2
    step("rm", path("moved.kv"))
    assert os.getxattr(path("hard.kv"), "user.kv.tokens") == b"10"
    # the mode bits hold for another uid, as the kernel checks them
    assert oct(os.stat(path("hard.kv")).st_mode & 0o777) == "0o600"
    assert "Permission denied" in step("head", "-c", "8", path("hard.kv"), user=NOBODY, ok=False)
    # the root is sticky (1777), like /tmp: nobody removes another's file
    assert "not permitted" in step("rm", "-f", path("hard.kv"), user=NOBODY, ok=False)
    step("chmod", "644", path("hard.kv"))
    assert step("head", "-c", "8", path("hard.kv"), user=NOBODY) == "SYMKV\0\0\1"
    step("truncate", "-s", "0", path("hard.kv"))
    assert os.getxattr(path("hard.kv"), "user.kv.tokens") == b"0"
    step("rm", path("hard.kv"), path("ctx/a.kv"))
    step("rmdir", path("ctx"))
    final = status(mount)
    assert (final["pages_used"], final["files"]) == ("0", "0")


def test_bytes_read_back_describe_the_file(mounted):
    import json
    import struct

    mount, socket = mounted
    with connect(socket) as lip:
        lip.kv("x.kv", create=True).append([7, 8, 9, 10, 11])
        model = lip.info["model"]["fingerprint"]
    with open(os.path.join(mount, "x.kv"), "rb") as f:
        data = f.read()
    assert data[:8] == b"SYMKV\0\0\1"
    (length,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + length])
    assert header | {"model": model, "num_tokens": 5, "num_pages": 2} == header
    ids = struct.unpack("<5i", data[12 + length : 12 + length + 20])
    assert ids == (7, 8, 9, 10, 11)
    assert len(data) == os.stat(os.path.join(mount, "x.kv")).st_size


def test_cp_forks_without_a_page_and_round_trips_through_disk(mounted, tmp_path):
    mount, socket = mounted
    path = lambda *p: os.path.join(mount, *p)  # noqa: E731
    with connect(socket) as lip:
        kv = lip.kv("orig.kv", create=True)
        kv.append(list(range(3, 17)))  # 14 tokens, 4 pages
    used = status(mount)["pages_used"]
    assert sh("cp", path("orig.kv"), path("copy.kv")).returncode == 0
    assert status(mount)["pages_used"] == used  # the copy took no page
    assert os.getxattr(path("copy.kv"), "user.kv.shared_pages") == b"4"
    assert os.stat(path("copy.kv")).st_blocks == 0
    assert sh("cmp", path("orig.kv"), path("copy.kv")).returncode == 0
    # out to disk, gone from the store, back in: the same bytes, the same continuation
    with connect(socket) as lip:
        before = lip.kv("orig.kv").fork("probe.kv").generate(max_tokens=6, temperature=0).text
        lip.kv("probe.kv").unlink()
    assert sh("cp", path("orig.kv"), str(tmp_path / "saved.kv")).returncode == 0
    assert sh("rm", path("orig.kv"), path("copy.kv")).returncode == 0
    assert status(mount)["pages_used"] == "0"
    assert sh("cp", str(tmp_path / "saved.kv"), path("back.kv")).returncode == 0
    assert sh("cmp", str(tmp_path / "saved.kv"), path("back.kv")).returncode == 0
    with connect(socket) as lip:
        assert lip.kv("back.kv").generate(max_tokens=6, temperature=0).text == before
    assert status(mount)["invariants"] == "ok"


def test_corrupted_or_truncated_kv_files_are_refused(mounted, tmp_path):
    import random

    mount, socket = mounted
    with connect(socket) as lip:
        lip.kv("good.kv", create=True).append(list(range(20, 31)))
    with open(os.path.join(mount, "good.kv"), "rb") as f:
        good = f.read()
    head_end = good.index(b"}") + 1
    rng = random.Random(0)
    baseline = status(mount)["pages_used"]
    bad_files = []
    for i in range(200):
        data = bytearray(good)
        kind = i % 4
        if kind == 0:  # cut short anywhere
            data = data[: rng.randrange(1, len(good))]
        elif kind == 1:  # a byte of the header changed
            data[rng.randrange(0, head_end)] ^= 0xFF
        elif kind == 2:  # bytes appended
            data += bytes(rng.randrange(1, 3000))
        else:  # header fields that do not fit this server
            field = rng.choice(
                [
                    b'"page_size": 4',
                    b'"num_layers": 2',
                    b'"version": 2',
                    b'"num_pages": 3',
                    b'"head_dim": 16',
                ]
            )
            data = bytearray(good.replace(field, field[:-1] + b"7", 1))
            if bytes(data) == good:
                data = data[:-1]
        bad_files.append(bytes(data))
    for i, data in enumerate(bad_files):
        target = os.path.join(mount, f"bad{i}.kv")
        with pytest.raises(OSError) as info, open(target, "wb") as f:
            f.write(data)
        assert info.value.errno == errno.EINVAL
        assert os.getxattr(target, "user.kv.tokens") == b"0"  # nothing half-imported
        os.unlink(target)
    final = status(mount)
    assert final["pages_used"] == baseline and final["invariants"] == "ok"


def test_sys_procs_and_metrics_and_fresh_sizes(mounted):
    mount, socket = mounted
    with connect(socket) as lip:
        kv = lip.kv("grow.kv", create=True)
        kv.append([1, 2, 3])
        size = os.stat(os.path.join(mount, "grow.kv")).st_size
        kv.append([4, 5, 6, 7, 8])  # through the syscalls: the mount sees it at once
        assert os.stat(os.path.join(mount, "grow.kv")).st_size > size
        assert os.getxattr(os.path.join(mount, "grow.kv"), "user.kv.tokens") == b"8"
        with open(os.path.join(mount, ".sys", "procs")) as f:
            procs = f.read().splitlines()
        assert procs[0].split() == ["pid", "uid", "state", "priority", "tokens", "syscalls", "name"]
        assert any(line.split()[2] == "running" for line in procs[1:])
    with open(os.path.join(mount, ".sys", "metrics")) as f:
        metrics = dict(ln.rsplit(" ", 1) for ln in f.read().splitlines() if not ln.startswith("#"))
    assert int(metrics['symphony_pages{state="used"}']) == 2
    assert int(metrics["symphony_files"]) == 1
    assert int(metrics["symphony_tokens_computed_total"]) >= 8
    assert sorted(os.listdir(os.path.join(mount, ".sys"))) == [
        "ctl",
        "metrics",
        "procs",
        "status",
        "text",
        "tokens",
    ]
    with pytest.raises(OSError), open(os.path.join(mount, ".sys", "status"), "w"):
        pass  # /.sys is read-only


def test_the_mount_example_lip(mounted):
    _, socket = mounted
    env = {**os.environ, "SYMPHONY_SOCKET": socket}
    out = subprocess.run(
        [sys.executable, "-m", "symphony.lipctl.cli", "run", str(ROOT / "examples/mount_files.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    tokens = int(lines["copy tokens"])
    assert int(lines["copy shares"].split()[0]) == -(-tokens // 4)  # every page (of 4 tokens)
    assert int(lines["copy blocks"].split()[0]) == 0
    assert lines["format"].strip() == repr(b"SYMKV\0\0\1")
    assert lines["left"].strip() == "[]"


@pytest.fixture
def stateful(tmp_path):
    server = StatefulServer(str(tmp_path / "state"))
    yield server
    server.close()


def test_files_persist_across_restart_and_fsynced_ones_across_sigkill(stateful):
    with connect(stateful.socket) as lip:
        lip.mkdir("d", mode=0o750)
        kv = lip.kv("d/kept.kv", create=True, mode=0o640)
        kv.append(list(range(3, 12)))
        before = kv.fork("d/probe.kv").generate(max_tokens=5, temperature=0).text
        lip.kv("d/probe.kv").unlink()
    stateful.stop()  # a clean stop writes everything
    stateful.start()
    with connect(stateful.socket) as lip:
        kv = lip.kv("d/kept.kv")
        st = kv.stat()
        assert (st["tokens"], st["mode"] & 0o777) == (9, 0o640)
        assert oct(os.stat(os.path.join(stateful.mount, "d")).st_mode & 0o777) == "0o750"
        assert kv.fork("d/probe.kv").generate(max_tokens=5, temperature=0).text == before
        lip.kv("d/probe.kv").unlink()
        # fsync writes one file through; later appends and other files are not
        kv.append([20, 21])
        fd = os.open(os.path.join(stateful.mount, "d/kept.kv"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        kv.append([22, 23, 24])
        lip.kv("d/lost.kv", create=True).append([1, 2, 3])
    stateful.stop(kill=True)  # SIGKILL: the mount is left stale
    stateful.start()
    with connect(stateful.socket) as lip:
        assert lip.kv("d/kept.kv").stat()["tokens"] == 11
        assert lip.listdir("d") == ["kept.kv"]


def test_an_unmount_from_outside_writes_every_file_and_the_socket_stays(stateful):
    with connect(stateful.socket) as lip:
        lip.kv("kept.kv", create=True).append([3, 4, 5, 6])  # never fsynced
    assert sh("fusermount3", "-u", stateful.mount).returncode == 0
    saved = os.path.join(stateful.state, "namespace.json")  # written after the files
    deadline = time.monotonic() + 10
    while not os.path.exists(saved):
        assert time.monotonic() < deadline, "the unmount wrote nothing"
        time.sleep(0.05)
    with connect(stateful.socket) as lip:  # still serving
        assert lip.kv("kept.kv").stat()["tokens"] == 4
    stateful.stop(kill=True)  # a SIGKILL now loses nothing
    stateful.start()
    with connect(stateful.socket) as lip:
        assert lip.kv("kept.kv").stat()["tokens"] == 4
