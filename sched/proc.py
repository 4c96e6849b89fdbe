"""One row of the process table: a LIP the server spawned, or an outside program."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.sched.limits import Limits, safe_name
from symphony.sched.lipregistry import LipTree
from symphony.sched.spawner import SpawnedChild
from symphony.sched.tasks import Account

MAX_OUTPUT = 4 * 1024 * 1024  # bytes of a program's output kept for `wait`


@dataclass
class Proc:
    """One row of the process table."""

    pid: int
    uid: int
    gid: int
    name: str
    account: Account
    spawned: bool
    state: str = "running"  # running, exited, killed
    started: float = field(default_factory=time.time)
    syscalls: int = 0
    exit_status: int | None = None
    output: list[tuple[int, bytes]] = field(default_factory=list)  # (fd, data) in order
    output_bytes: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    child: SpawnedChild | None = None
    tree: LipTree | None = None  # a spawned LIP's token, workdir and cgroup
    limits: Limits | None = None  # as capped by the server
    lip: int | None = None  # an outside process of a LIP's tree: the LIP it counts for

    def __post_init__(self) -> None:
        self.name = safe_name(self.name)  # one field of one /.sys/procs line

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def row(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "name": self.name,
            "state": self.state,
            "spawned": self.spawned,
            "priority": self.account.priority,
            "tokens": self.account.tokens_computed,
            "pages": self.account.pages_allocated,  # held now: freed pages are given back
            "pages_allocated": self.account.pages_allocated,
            "syscalls": self.syscalls,
            "exit_status": self.exit_status,
            "seconds": round(time.time() - self.started, 3),
            "lip": self.lip if not self.spawned else self.pid,
            "limits": self.limits.row() if self.limits is not None else None,
        }


def process_name(pid: int) -> str:
    """The program a process runs, from its command line (`python prog.py`: prog.py)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [p.decode(errors="replace") for p in parts if p]
    # for `python prog.py`, the program's name
    for word in words[1:]:
        if not word.startswith("-"):
            return os.path.basename(word)
    return os.path.basename(words[0]) if words else "?"
