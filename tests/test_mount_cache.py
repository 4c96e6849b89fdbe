"""The mount under change: the kernel's caches stay true, a full pool says ENOSPC, and
readers, writers and syscalls on the same files at once leave a consistent store."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from symphony.lipctl import SymphonyError, connect
from tests.mount_helpers import needs_fuse, sh, status
from tests.server_helpers import ROOT

pytestmark = needs_fuse


def test_names_and_attributes_are_never_stale(mounted):
    mount, socket = mounted
    path = lambda name: os.path.join(mount, name)  # noqa: E731
    with connect(socket) as lip:
        a = lip.kv("a.kv", create=True)
        a.append(list(range(3, 13)))  # 10 tokens: pages of 4, 3 pages
        first = os.stat(path("a.kv"))
        page_blocks = first.st_blksize // 512
        assert first.st_blocks == 3 * page_blocks
        assert "a.kv" in sh("ls", "-l", mount).stdout  # the kernel now caches both
        a.fork("b.kv")  # through the syscalls: a shares every page now
        assert os.stat(path("a.kv")).st_blocks == 0
        a.append([20, 21])  # a copies the shared partial page and grows
        grown = os.stat(path("a.kv"))
        assert (grown.st_size, grown.st_blocks) > (first.st_size, 0)
        assert grown.st_mtime_ns > first.st_mtime_ns
        a.truncate(2)  # b alone holds its last two pages now
        assert os.stat(path("a.kv")).st_size < first.st_size
        assert os.stat(path("b.kv")).st_blocks == 2 * page_blocks
        lip.kv("b.kv").unlink()
        assert not os.path.exists(path("b.kv"))
        assert sh("ls", mount).stdout.split() == ["a.kv"]
        lip.kv("b.kv", create=True)  # the name comes back as a new, empty file
        assert os.stat(path("b.kv")).st_size < first.st_size
    # a cp through the mount changes what the source (cached by the kernel) shares
    assert os.stat(path("a.kv")).st_blocks == page_blocks
    assert sh("cp", path("a.kv"), path("c.kv")).returncode == 0
    assert os.stat(path("a.kv")).st_blocks == os.stat(path("c.kv")).st_blocks == 0
    assert status(mount)["invariants"] == "ok"


def test_a_full_pool_evicts_cached_pages_then_says_enospc(mounted, tmp_path):
    mount, socket = mounted  # 64 pages of 4 tokens
    rng = random.Random(1)
    with connect(socket) as lip:
        lip.kv("big.kv", create=True).append([rng.randrange(256) for _ in range(200)])
        saved = tmp_path / "big.kv"
        assert sh("cp", os.path.join(mount, "big.kv"), str(saved)).returncode == 0
        lip.kv("big.kv").unlink()
        assert int(status(mount)["pages_cached"]) == 50  # its full pages, kept for reuse
        fill = lip.kv("fill.kv", create=True)
        fill.append([rng.randrange(256) for _ in range(240)])  # 60 pages: evicts cached ones
        st = status(mount)
        assert int(st["pages_used"]) == 60 and int(st["pages_cached"]) <= 4
        # an import that does not fit: ENOSPC, and an empty file rather than half of one
        out = sh("cp", str(saved), os.path.join(mount, "back.kv"))
        assert out.returncode != 0 and "No space left on device" in out.stderr
        assert os.getxattr(os.path.join(mount, "back.kv"), "user.kv.tokens") == b"0"
        # a syscall that does not fit: a clear error, the file as it was
        with pytest.raises(SymphonyError) as info:
            fill.append([rng.randrange(256) for _ in range(40)])
        assert info.value.errno == "ENOSPC" and "out of KV pages" in str(info.value)
        assert fill.stat()["tokens"] == 240
        st = status(mount)
        assert (st["pages_used"], st["invariants"]) == ("60", "ok")
        fill.unlink()
    os.unlink(os.path.join(mount, "back.kv"))
    assert sh("cp", str(saved), os.path.join(mount, "back.kv")).returncode == 0
    assert sh("cmp", str(saved), os.path.join(mount, "back.kv")).returncode == 0


def parse_kv(data: bytes, page_bytes: int) -> int:
    """Check that `data` is one whole KV file; return its token count."""
    assert data[:8] == b"SYMKV\0\0\1"
    (length,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12 : 12 + length])
    assert header["version"] == 2
    head = 12 + length + 8 * header["num_tokens"]  # ids, then positions
    assert header["num_pages"] == -(-header["num_tokens"] // header["page_size"])
    assert len(data) == head + header["num_pages"] * page_bytes
    return int(header["num_tokens"])


def test_readers_writers_and_syscalls_on_the_same_files(mounted):
    mount, socket = mounted
    base = os.path.join(mount, "base.kv")
    with connect(socket) as lip:
        lip.kv("base.kv", create=True).append(list(range(30, 70)))  # 40 tokens
    page_bytes = os.stat(base).st_blksize
    stop_at = time.monotonic() + 4
    errors: list[BaseException] = []
    counts: dict[str, int] = {}
    torn: list[int] = []

    def loop(name, body):  # type: ignore[no-untyped-def]
        def run() -> None:
            i = 0
            try:
                while time.monotonic() < stop_at:
                    body(i)
                    i += 1
            except BaseException as exc:  # reported by the test below
                errors.append(exc)
            counts[name] = i

        return threading.Thread(target=run, name=name)

    def read(i: int) -> None:
        with open(base, "rb") as f:
            assert 40 <= parse_kv(f.read(), page_bytes) <= 48

    def append(i: int) -> None:
        with connect(socket) as lip:
            kv = lip.kv("base.kv")
            kv.append([80 + i % 50])
            if kv.stat()["tokens"] >= 48:
                kv.truncate(40)

    def copy(i: int) -> None:
        dst = os.path.join(mount, f"copy{i}.kv")
        out = sh("cp", base, dst)
        tokens = int(os.getxattr(dst, "user.kv.tokens"))
        if out.returncode:
            # cp's copy_file_range stops at the size the kernel sees at each call: a file
            # rolled back meanwhile is copied torn, and the import refuses it whole
            assert "Invalid argument" in out.stderr and tokens == 0
            torn.append(i)
        else:
            assert 40 <= tokens <= 48
            os.setxattr(dst, "user.kv.tokens", b"20")  # roll the copy back
            with open(dst, "rb") as f:
                assert parse_kv(f.read(), page_bytes) == 20
        os.unlink(dst)

    def fork_and_generate(i: int) -> None:
        with connect(socket) as lip:
            fork = lip.kv("base.kv").fork(f"gen{i}.kv")
            fork.generate(max_tokens=3, temperature=0)
            assert os.stat(os.path.join(mount, f"gen{i}.kv")).st_size > 0
            fork.unlink()

    threads = [
        loop("reader1", read),
        loop("reader2", read),
        loop("append", append),
        loop("copy", copy),
        loop("generate", fork_and_generate),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(counts[t.name] > 0 for t in threads), counts
    assert len(torn) < counts["copy"], "no whole copy was made"
    with connect(socket) as lip:
        tokens = lip.kv("base.kv").stat()["tokens"]
        assert lip.listdir("") == ["base.kv"]
    st = status(mount)
    assert st["invariants"] == "ok"
    assert int(st["pages_used"]) == -(-tokens // 4)  # nothing leaked


def test_pages_given_back_by_a_killed_program_show_in_du_at_once(mounted):
    mount, socket = mounted
    path = lambda name: os.path.join(mount, name)  # noqa: E731
    with connect(socket) as lip:
        lip.kv("a.kv", create=True).append(list(range(3, 13)))
        lip.kv("a.kv").fork("b.kv")
    assert os.stat(path("b.kv")).st_blocks == 0  # shares every page with a
    generating = textwrap.dedent(
        f"""
        from symphony.lipctl import connect
        with connect({socket!r}) as lip:
            print("go", flush=True)
            lip.kv("a.kv").generate(max_tokens=1500, temperature=0)
        """
    )
    program = subprocess.Popen(
        [sys.executable, "-c", generating], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert program.stdout is not None and program.stdout.readline() == "go\n"
        time.sleep(0.3)  # generating now
        os.unlink(path("a.kv"))  # busy: its pages stay until the generate ends
    finally:
        program.kill()
        program.wait()
    # the killed call is reaped, a's pages go, and b owns its pages alone
    deadline = time.monotonic() + 10  # well within the kernel's 60 s attribute timeout
    while os.stat(path("b.kv")).st_blocks == 0:
        assert time.monotonic() < deadline, "du of b.kv still shows shared pages"
        time.sleep(0.05)
    assert status(mount)["invariants"] == "ok"


def test_an_open_file_outlives_its_name(mounted):
    mount, socket = mounted
    with connect(socket) as lip:
        lip.kv("gone.kv", create=True).append([5, 6, 7, 8, 9])
    with open(os.path.join(mount, "gone.kv"), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        os.unlink(os.path.join(mount, "gone.kv"))
        assert os.fstat(f.fileno()).st_size == size
        assert parse_kv(f.read(), os.fstat(f.fileno()).st_blksize) == 5
    assert not os.path.exists(os.path.join(mount, "gone.kv"))
    assert status(mount)["pages_used"] == "0"
