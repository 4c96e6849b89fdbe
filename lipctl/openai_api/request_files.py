"""Where the requests' KV files live, and what becomes of those of a killed server.

Each request's files are in a folder of the LIP user's own (0700) and go when the
request ends. A LIP killed mid-request (`lipctl kill`, a crash) cannot remove them, and
files outlive their programs, as files do; so each name begins with the pid of the LIP
that made it (and its pid namespace), and a LIP starting up removes the files of pids
of its namespace that no longer run. Sweeping too little is safe, a live server's files
never: a pid taken since by another process keeps its files until that one ends, and
files of another namespace (a LIP in another container) stay.
"""

from __future__ import annotations

import logging
import os
import uuid

from symphony.lipctl.aio import AsyncLip
from symphony.lipctl.scratch import remove_where

log = logging.getLogger(__name__)


def request_base(folder: str) -> str:
    """A fresh name stem for one request's files: `folder/NAMESPACE-PID-HEX`."""
    return f"{folder}/{_namespace() or 'unknown'}-{os.getpid()}-{uuid.uuid4().hex}"


async def sweep(lip: AsyncLip, folder: str) -> int:
    """Remove the files in `folder` of LIPs that no longer run; returns how many."""
    here = _namespace()
    if here is None:  # whose pids are whose cannot be told: sweep nothing
        return 0

    def left_by_the_dead(name: str) -> bool:
        namespace, pid, rest = [*name.split("-", 2), "", ""][:3]
        return namespace == here and pid.isdigit() and bool(rest) and not _running(int(pid))

    removed = await remove_where(lip, folder, left_by_the_dead)
    if removed:
        log.info("removed %d files left by stopped servers in %s", removed, folder)
    return removed


def _namespace() -> str | None:
    """This process's pid namespace, as a number (its inode); None where unreadable."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None
    return "".join(c for c in link if c.isdigit()) or None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True
