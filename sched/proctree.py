"""A LIP's whole process tree, from /proc: who belongs to it, and ending all of it.

A LIP is a child subreaper (sched/launcher.py), so while it lives its descendants keep
a parent link to it even after a double fork or `setsid()`. Each also inherits the
LIP's token in its environment (TOKEN_VAR), which still names it once the LIP is gone
and init has adopted it. A program that clears both (a fresh environment and no
subreaper) can escape; cgroups would close that and are the next step where the
server may create them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

TOKEN_VAR = "SYMPHONY_LIP"
_TOKEN_PREFIX = TOKEN_VAR.encode() + b"="
_MAX_ROUNDS = 50  # of scan-and-stop; a fork bomb stopped one generation a round


@dataclass(frozen=True)
class ProcStat:
    """What /proc/PID/stat says of one process."""

    pid: int
    ppid: int
    state: str  # R, S, D, T, Z...
    start_time: int  # clock ticks after boot: tells a reused pid from the first

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """The process's /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may itself hold spaces and ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(pid, int(fields[1]), fields[0].decode(), int(fields[19]))
    except (IndexError, ValueError):
        return None


def all_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := read_stat(int(entry))) is not None:
            stats[st.pid] = st
    return stats


def token_of(pid: int) -> str | None:
    """The LIP token in the process's environment (readable by root or its own uid)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(_TOKEN_PREFIX):
            return item[len(_TOKEN_PREFIX) :].decode(errors="replace")
    return None


def ancestors(pid: int, limit: int = 64) -> list[int]:
    """The parent, grandparent... of `pid`, nearest first, up to init."""
    chain: list[int] = []
    st = read_stat(pid)
    while st is not None and st.ppid > 1 and len(chain) < limit:
        chain.append(st.ppid)
        st = read_stat(st.ppid)
    return chain


def members(
    root: tuple[int, int] | None,
    tokens: frozenset[str],
    stats: dict[int, ProcStat],
    seen: dict[tuple[int, int], str | None] | None = None,
) -> set[int]:
    """Live processes of the trees: `root` (pid, start time), every process holding one of
    `tokens`, and all their descendants. `seen` caches tokens by (pid, start time)."""
    found = set()
    if root is not None and (st := stats.get(root[0])) and st.start_time == root[1]:
        found.add(root[0])
    if tokens:
        seen = {} if seen is None else seen
        for st in stats.values():
            key = (st.pid, st.start_time)
            if key not in seen:
                seen[key] = token_of(st.pid)
            if seen[key] in tokens:
                found.add(st.pid)
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if not stats[pid].dead}


def kill_tree(root: tuple[int, int] | None, tokens: frozenset[str]) -> int:
    """SIGKILL every member of the trees (see `members`); returns how many were killed.

    Members are stopped first, round after round until no new one appears and all are
    stopped, so none can fork a child past the last scan. Signals go through pidfds
    opened and checked against the scan, so a pid reused meanwhile is never signalled.
    """
    stopped: dict[int, int] = {}  # pid -> pidfd
    seen: dict[tuple[int, int], str | None] = {}  # environments read in earlier rounds
    try:
        for _ in range(_MAX_ROUNDS):
            stats = all_stats()
            fresh = members(root, tokens, stats, seen) - stopped.keys()
            for pid in fresh:
                fd = _pidfd(pid, stats[pid].start_time)
                if fd is None:  # gone, or no fd left: signal by pid, checked just before
                    if _same(pid, stats[pid].start_time):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    continue
                stopped[pid] = fd
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGSTOP)
            if not fresh and all(_halted(pid) for pid in stopped):
                break
            time.sleep(0.001)  # let the stops land before the next scan
        for fd in stopped.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd in stopped.values():
            os.close(fd)
    return len(stopped)


def _pidfd(pid: int, start_time: int) -> int | None:
    """A pidfd of the process `pid` started at `start_time`, if it still runs."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if _same(pid, start_time):  # checked after opening: the fd is that very process
        return fd
    os.close(fd)
    return None


def _same(pid: int, start_time: int) -> bool:
    now = read_stat(pid)
    return now is not None and now.start_time == start_time


def _halted(pid: int) -> bool:
    st = read_stat(pid)
    return st is None or st.dead or st.state in ("T", "t")
