"""A file of the LIPs a server runs, so that the next server ends what a killed one left.

One JSON map `token -> {"workdir", "pid", "start_time"}`, rewritten whole (a new file
renamed over the old one) whenever a LIP starts or ends. A workdir is written down
before its program starts, so a server killed mid-spawn leaves nothing unrecorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from typing import Any

from symphony.sched.proctree import kill_tree

log = logging.getLogger(__name__)

WORKDIR_PREFIX = "symphony-lip-"


class LipRegistry:
    """The LIPs of this server, on disk at `path` (None: kept in memory only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, token: str, workdir: str) -> None:
        self.entries[token] = {"workdir": workdir, "pid": None, "start_time": None}
        self._save()

    def started(self, token: str, pid: int, start_time: int) -> None:
        self.entries[token].update(pid=pid, start_time=start_time)
        self._save()

    def remove(self, token: str) -> None:
        if self.entries.pop(token, None) is not None:
            self._save()

    def end_leftovers(self) -> int:
        """End the LIPs (their whole trees) and remove the workdirs that an earlier server
        on this path left, then forget them; returns how many processes were killed."""
        left = self._load()
        if not left:
            return 0
        killed = 0
        for token, entry in left.items():
            pid, start_time = entry.get("pid"), entry.get("start_time")
            root = (
                (pid, start_time) if isinstance(pid, int) and isinstance(start_time, int) else None
            )
            killed += kill_tree(root, frozenset([token]))
            workdir = entry.get("workdir")
            if isinstance(workdir, str) and _is_workdir(workdir):
                shutil.rmtree(workdir, ignore_errors=True)
        log.warning("ended %d processes and %d workdirs left by a server", killed, len(left))
        self._save()
        return killed

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
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
                return {}
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}

    def _save(self) -> None:
        """Write the entries; a registry that cannot be written only costs the cleanup
        after a crash, so it is logged and the server goes on."""
        if self.path is None:
            return
        try:
            if not self.entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                return
            folder = os.path.dirname(os.path.abspath(self.path))
            fd, tmp = tempfile.mkstemp(prefix=".lips-", dir=folder)  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.entries, f)
                os.replace(tmp, self.path)  # replaces a planted link, never its target
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot write the LIP registry %s: %s", self.path, exc)


def _is_workdir(path: str) -> bool:
    return os.path.isabs(path) and os.path.basename(path).startswith(WORKDIR_PREFIX)
