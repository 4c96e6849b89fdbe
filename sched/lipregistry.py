"""What a LIP is made of beyond its process, and the file where a server writes them
down, so that the next server ends what a killed one left.

The file is JSON, `{"server": [pid, start_time], "lips": {token: LipTree}}`, rewritten
whole (a new file renamed over the old one) whenever a LIP starts or ends; a server
that still runs keeps its LIPs (a second server started on the same socket by mistake
ends nothing). A LIP's workdir and cgroup are written
down before its program runs, so a server killed mid-spawn leaves nothing unrecorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from symphony.sched.cgroups import CGROUP_PREFIX, Cgroups
from symphony.sched.proctree import kill_tree, read_stat

log = logging.getLogger(__name__)

WORKDIR_PREFIX = "symphony-lip-"


@dataclass
class LipTree:
    """One LIP's token (in its tree's environment), workdir, cgroup, pid and start time."""

    token: str
    workdir: str
    cgroup: str | None = None
    pid: int | None = None
    start_time: int | None = None  # of pid, in clock ticks after boot

    def end(self, main_alive: bool = True) -> int:
        """SIGKILL every process of the tree (the LIP too, if `main_alive` and its pid
        still names the process that started at start_time); returns how many."""
        if self.cgroup is not None:
            Cgroups.kill(self.cgroup)
        root = None
        if main_alive and self.pid is not None and self.start_time is not None:
            root = (self.pid, self.start_time)
        return kill_tree(root, frozenset([self.token]))

    def remove(self) -> bool:
        """Remove the workdir and the cgroup; False while the cgroup stays busy."""
        if _named(self.workdir, WORKDIR_PREFIX):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.cgroup is not None and _named(self.cgroup, CGROUP_PREFIX):
            return Cgroups.remove(self.cgroup)
        return True

    @classmethod
    def from_json(cls, token: str, data: Any) -> LipTree | None:
        if not isinstance(data, dict) or not isinstance(data.get("workdir"), str):
            return None
        tree = cls(token, data["workdir"])
        if isinstance(data.get("cgroup"), str):
            tree.cgroup = data["cgroup"]
        if isinstance(data.get("pid"), int) and isinstance(data.get("start_time"), int):
            tree.pid, tree.start_time = data["pid"], data["start_time"]
        return tree


class LipRegistry:
    """The LIPs of this server, on disk at `path` (None: kept in memory only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.trees: dict[str, LipTree] = {}

    def add(self, tree: LipTree) -> None:
        """Write `tree` down (again, once it changed)."""
        self.trees[tree.token] = tree
        self._save()

    def remove(self, token: str) -> None:
        if self.trees.pop(token, None) is not None:
            self._save()

    def end_leftovers(self) -> int:
        """End the LIPs (their whole trees) and remove the workdirs and cgroups that an
        earlier server on this path left, then forget them; returns the processes killed."""
        left = self._load()
        killed = 0
        for tree in left:
            killed += tree.end()
            if not tree.remove():
                self.trees[tree.token] = tree  # still busy: the next start tries again
        if left:
            log.warning("ended %d processes of %d LIPs a server left", killed, len(left))
            self._save()
        return killed

    def _load(self) -> list[LipTree]:
        if self.path is None:
            return []
        try:
            st = os.lstat(self.path)
            # only a file this server's user wrote is trusted to name processes to kill
            trusted = (
                stat.S_ISREG(st.st_mode)
                and st.st_uid == os.geteuid()
                and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            )
            if not trusted:
                log.warning(
                    "ignoring %s: not a file of this user, or writable by others", self.path
                )
                return []
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return []
        lips = data.get("lips") if isinstance(data, dict) else None
        if not isinstance(lips, dict):
            return []
        owner = data.get("server")
        if isinstance(owner, list) and len(owner) == 2 and _runs(*owner):
            log.warning(
                "%s belongs to server pid %s, still running: left alone", self.path, owner[0]
            )
            return []
        trees = [LipTree.from_json(k, v) for k, v in lips.items() if isinstance(k, str)]
        return [t for t in trees if t is not None]

    def _save(self) -> None:
        """Write the entries; a registry that cannot be written only costs the cleanup
        after a crash, so it is logged and the server goes on."""
        if self.path is None:
            return
        try:
            if not self.trees:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            folder = os.path.dirname(os.path.abspath(self.path))
            fd, tmp = tempfile.mkstemp(prefix=".lips-", dir=folder)  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(
                        {
                            "server": [os.getpid(), _start_time(os.getpid())],
                            "lips": {k: asdict(t) for k, t in self.trees.items()},
                        },
                        f,
                    )
                os.replace(tmp, self.path)  # replaces a planted link, never its target
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot write the LIP registry %s: %s", self.path, exc)


def _start_time(pid: int) -> int | None:
    st = read_stat(pid)
    return st.start_time if st is not None else None


def _runs(pid: object, start_time: object) -> bool:
    """Whether the process `pid` that started at `start_time` still runs (not a zombie)."""
    if not isinstance(pid, int) or not isinstance(start_time, int):
        return False
    st = read_stat(pid)
    return st is not None and not st.dead and st.start_time == start_time


def _named(path: str, prefix: str) -> bool:
    return os.path.isabs(path) and os.path.basename(path).startswith(prefix)
