"""The process table: LIPs the server spawned, and outside programs known by peer pid."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.sched.tasks import Account

log = logging.getLogger(__name__)

MAX_OUTPUT = 4 * 1024 * 1024  # bytes of a program's output kept for `wait`


@dataclass(frozen=True)
class Limits:
    """rlimits and scheduling limits of one LIP."""

    cpu_seconds: int = 3600
    wall_seconds: int | None = None  # killed when it runs longer
    tokens: int | None = None  # tokens the scheduler computes for it, at most
    address_space: int = 4 << 30
    open_files: int = 256
    pages: int | None = None
    priority: int = 0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Limits:
        known = {
            "cpu_seconds",
            "wall_seconds",
            "tokens",
            "address_space",
            "open_files",
            "pages",
            "priority",
        }
        bad = set(args) - known
        if bad:
            raise StoreError(errno.EINVAL, f"unknown limit {sorted(bad)[0]!r}")
        for key, value in args.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise StoreError(errno.EINVAL, f"limit {key} must be an integer")
        limits = cls(**args)
        too_small = (
            limits.cpu_seconds < 1
            or limits.open_files < 16
            or limits.address_space < 1 << 26
            or (limits.wall_seconds is not None and limits.wall_seconds < 1)
        )
        if too_small:
            raise StoreError(errno.EINVAL, "limits too small to start a program")
        return limits


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
    process: trio.Process | None = None
    workdir: str | None = None

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
            "pages_allocated": self.account.pages_allocated,
            "syscalls": self.syscalls,
            "exit_status": self.exit_status,
            "seconds": round(time.time() - self.started, 3),
        }


def _drop_privileges(cred: Cred, limits: Limits) -> Any:
    def preexec() -> None:  # runs in the child between fork and exec
        os.setsid()
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(cred.gid)
            os.setuid(cred.uid)

    return preexec


class ProcessTable:
    """Who is connected and what the server runs; spawn, kill, wait."""

    def __init__(self, socket_path: str, mount: str | None = None) -> None:
        self.socket_path = socket_path
        self.mount = mount  # told to programs as SYMPHONY_MOUNT
        self.procs: dict[int, Proc] = {}

    def attach(self, pid: int, cred: Cred) -> Proc:
        """The process a new connection belongs to: a spawned LIP, or an outside program."""
        proc = self.procs.get(pid)
        if proc is None or proc.state != "running":
            name = _process_name(pid)
            proc = Proc(pid, cred.uid, cred.gid, name, Account(pid), spawned=False)
            self.procs[pid] = proc
        return proc

    def detach(self, proc: Proc) -> None:
        """An outside program's last connection closed: it leaves the table."""
        if not proc.spawned:
            proc.state = "exited"
            self.procs.pop(proc.pid, None)

    async def spawn(
        self,
        nursery: trio.Nursery,
        cred: Cred,
        program: str,
        args: list[str],
        name: str,
        env: dict[str, str],
        limits: Limits,
    ) -> Proc:
        """Start `program` (Python source) as `cred`'s uid and gid, output captured.

        Raises:
            StoreError: EPERM when the server cannot take on that uid (it is not root
                and the caller is another user); EAGAIN when the program cannot start.
        """
        if os.getuid() != 0 and cred.uid != os.getuid():
            raise StoreError(
                errno.EPERM,
                "this server does not run as root: it runs programs of its own user only",
            )
        workdir = tempfile.mkdtemp(prefix="symphony-lip-")
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write(program)
        if os.getuid() == 0:
            os.chown(workdir, cred.uid, cred.gid)
            os.chown(path, cred.uid, cred.gid)
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": workdir,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **env,
            "SYMPHONY_SOCKET": self.socket_path,
            **({"SYMPHONY_MOUNT": self.mount} if self.mount else {}),
            "PYTHONUNBUFFERED": "1",
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, path, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=child_env,
                preexec_fn=_drop_privileges(cred, limits),
            )
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise StoreError(errno.EAGAIN, f"cannot start the program: {exc}") from None
        account = Account(
            process.pid, limits.priority, page_quota=limits.pages, token_quota=limits.tokens
        )
        proc = Proc(
            process.pid,
            cred.uid,
            cred.gid,
            name,
            account,
            spawned=True,
            process=process,
            workdir=workdir,
        )
        self.procs[proc.pid] = proc
        nursery.start_soon(self._supervise, proc, limits.wall_seconds)
        return proc

    async def _supervise(self, proc: Proc, wall_seconds: int | None) -> None:
        process = proc.process
        assert process is not None and process.stdout is not None and process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, proc, 1, process.stdout)
            nursery.start_soon(self._pump, proc, 2, process.stderr)
            with trio.move_on_after(wall_seconds if wall_seconds is not None else math.inf):
                await process.wait()
            if process.returncode is None:  # over its wall-time limit
                log.warning("pid %d (%s) ran past %s s: killed", proc.pid, proc.name, wall_seconds)
                self.kill(proc.pid, Cred(0, 0))
            status = await process.wait()
        proc.exit_status = status
        if proc.state == "running":
            proc.state = "killed" if status < 0 else "exited"
        if proc.workdir:
            shutil.rmtree(proc.workdir, ignore_errors=True)
        log.info("pid %d (%s) %s with status %d", proc.pid, proc.name, proc.state, status)
        proc.notify()

    async def _pump(self, proc: Proc, fd: int, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                if proc.output_bytes < MAX_OUTPUT:
                    proc.output.append((fd, bytes(data)))
                    proc.output_bytes += len(data)
                proc.notify()

    def kill(self, pid: int, cred: Cred) -> Proc:
        proc = self.procs.get(pid)
        if proc is None or not proc.spawned:
            raise StoreError(errno.ESRCH, f"no program {pid} run by this server")
        if not cred.is_root and cred.uid != proc.uid:
            raise StoreError(errno.EPERM, f"program {pid} belongs to uid {proc.uid}")
        if proc.state == "running" and proc.process is not None:
            proc.state = "killed"
            _kill_session(proc.pid)
        return proc

    def reap_finished(self, keep: int = 100) -> None:
        """Forget the oldest finished programs beyond `keep`."""
        done = [p for p in self.procs.values() if p.spawned and p.state != "running"]
        for proc in sorted(done, key=lambda p: p.started)[:-keep]:
            del self.procs[proc.pid]

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.spawned and proc.state == "running":
                _kill_session(proc.pid)


def _kill_session(pid: int) -> None:
    """SIGKILL a spawned program and anything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _process_name(pid: int) -> str:
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
