"""Waiting on spawned LIPs in tests, always with a deadline."""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator

import trio

from symphony.sched.processes import Proc
from tests.server_helpers import ROOT


async def wait_exit(proc: Proc, timeout: float = 10) -> int:
    """The LIP's exit status once the table saw it end (output pumped, workdir gone)."""
    with trio.fail_after(timeout):
        while proc.exit_status is None:
            await proc.changed.wait()
    return proc.exit_status


def stdout(proc: Proc) -> bytes:
    return b"".join(data for fd, data in proc.output if fd == 1)


async def lines_of(proc: Proc, n: int, timeout: float = 10) -> list[str]:
    """The first `n` lines the LIP printed on stdout."""
    with trio.fail_after(timeout):
        while True:
            changed = proc.changed
            text = stdout(proc).decode()
            if text.count("\n") >= n or proc.exit_status is not None:
                return text.splitlines()[:n]
            await changed.wait()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] not in (b"Z", b"X")


async def gone(pid: int, timeout: float = 10) -> bool:
    with trio.move_on_after(timeout):
        while alive(pid):
            await trio.sleep(0.02)
    return not alive(pid)


@contextlib.contextmanager
def reachable_by_others() -> Iterator[None]:
    """Let other uids search every folder above the checkout (they run its Python and
    the launcher), as tests/test_e2e.py does; modes put back after."""
    changed = []
    for folder in [ROOT, *ROOT.parents]:
        mode = stat.S_IMODE(folder.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(folder, mode | stat.S_IXOTH)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in changed:
            os.chmod(folder, mode)


def gone_within(pid: int, timeout: float = 10) -> bool:
    """`gone` for tests outside trio."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)
