"""One cgroup v2 per LIP, where the server may make them: a tree no process leaves.

/proc links and tokens (sched/proctree.py) can be shed by a program that wants out; a
cgroup cannot be, since moving a process needs write access to the cgroup.procs of an
ancestor the server owns. The LIP's cgroup is made below the server's own, the
launcher put into it before it execs the program, and `cgroup.kill` ends the whole
tree at once. Without a writable cgroup2 mount this is off and /proc alone is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger(__name__)

CGROUP_PREFIX = "symphony-lip-"


def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return left.split()[4]
    except OSError:
        pass
    return None


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path, relative to the cgroup2 mount ("/a/b")."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class Cgroups:
    """Makes, fills, kills and removes the cgroups of LIPs (all no-ops when off)."""

    def __init__(self, enabled: bool = True) -> None:
        self.mount = _cgroup2_mount() if enabled else None
        own = cgroup_of(os.getpid()) if self.mount else None
        self.base: str | None = None
        if self.mount and own is not None:
            base = os.path.join(self.mount, own.lstrip("/"))
            if os.access(base, os.W_OK):
                self.base = base

    def create(self, token: str) -> str | None:
        """A new empty cgroup for one LIP (its folder), or None where cgroups are off."""
        if self.base is None:
            return None
        path = os.path.join(self.base, CGROUP_PREFIX + token)
        try:
            os.mkdir(path)
        except OSError as exc:
            log.warning("cgroups off: cannot make %s: %s", path, exc)
            self.base = None
            return None
        if not os.path.exists(os.path.join(path, "cgroup.kill")):  # before Linux 5.14
            log.warning("cgroups off: no cgroup.kill in %s", path)
            os.rmdir(path)
            self.base = None
            return None
        return path

    def enter(self, path: str, pid: int) -> None:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def relative(self, path: str) -> str | None:
        """`path` as /proc/PID/cgroup names it."""
        if self.mount is None:
            return None
        return "/" + os.path.relpath(path, self.mount)

    @staticmethod
    def kill(path: str) -> None:
        """SIGKILL every process in the cgroup, at once."""
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")

    @staticmethod
    def populated(path: str) -> bool:
        """Whether a process still lives in the cgroup (False once it is gone)."""
        try:
            with open(os.path.join(path, "cgroup.events")) as f:
                return "populated 1" in f.read()
        except OSError:
            return False

    @staticmethod
    def remove(path: str, timeout: float = 1.0) -> bool:
        """Kill what is left in the cgroup and remove it; False if it stays busy."""
        if not os.path.basename(path).startswith(CGROUP_PREFIX):
            return False
        deadline = time.monotonic() + timeout
        while True:
            Cgroups.kill(path)
            try:
                os.rmdir(path)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s stays busy", path)
                    return False
                time.sleep(0.01)  # killed processes take a moment to leave
