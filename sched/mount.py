"""The mount: the server's store served with pyfuse3, in the same trio run as the socket.

This is where the filesystem meets the server: /.sys text is made from the server's
state, /.sys/ctl lines run as syscalls, and the kernel's caches are invalidated after
every engine step and every call.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred, KVFile
from symphony.sched.control import ControlSession, Waiters

FUSE_TASKS = 128  # pyfuse3 request tasks: each blocked /.sys/ctl read holds one
CTL_WAITERS = 64  # at most these reads of /.sys/ctl wait at once; more get EAGAIN
CTL_WAITERS_PER_UID = 16
INVARIANTS_EVERY = 1.0  # seconds /.sys/status reuses its invariant check

if TYPE_CHECKING:
    from symphony.sched.server import Server


class Mount:
    """The store at `mountpoint` while `run` runs; unmounted however it ends."""

    def __init__(self, server: Server, mountpoint: str) -> None:
        from symphony.fs.fuse_cache import KernelCache  # pyfuse3: only when mounting

        self.server = server
        self.mountpoint = mountpoint
        self.cache = KernelCache(server.store)
        self.ctl_waiters = Waiters(CTL_WAITERS, CTL_WAITERS_PER_UID)
        self._disk = trio.CapacityLimiter(1)  # one write to the state directory at a time
        self._checked = (-math.inf, "")  # when the invariants were last checked, and how

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import pyfuse3

        from symphony.fs.fuse_ops import KVFileSystem
        from symphony.fs.fuse_sys import SysTree

        server = self.server
        clean_stale_mount(self.mountpoint)
        tree = SysTree(server.store, server.engine.tokenizer, self.sys_text, self.open_ctl)
        state = server.state
        ops = KVFileSystem(
            server.store, tree, self.cache, self.save_file if state is not None else None
        )
        ops.verify = self.verify_file
        options = {"fsname=symphony", "subtype=kv", "default_permissions"}
        if os.getuid() == 0:
            options.add("allow_other")  # every user sees the store; the mode bits decide
        try:
            pyfuse3.init(ops, self.mountpoint, options)
        except RuntimeError as exc:  # pyfuse3 says only "fuse_session_mount failed"
            raise StoreError(errno.EIO, f"cannot mount at {self.mountpoint}: {exc}") from None
        self.cache.live = True
        try:
            task_status.started()
            await pyfuse3.main(max_tasks=FUSE_TASKS)
            # main returns when the kernel ends the session: unmounted from outside, and
            # no release comes for the files still open through the mount
            ops.close_all()
            if state is not None:  # an unmount writes every file, as a shutdown does
                await self._save_all()
            print(
                f"symphony: {self.mountpoint} was unmounted; serving the socket only",
                file=sys.stderr,
                flush=True,
            )
        finally:
            with trio.CancelScope(shield=True):
                await self.cache.close()
            pyfuse3.close(unmount=True)
            ops.close_all()  # what the session left open holds pages no longer

    async def _save_all(self) -> None:
        """Every file through, in a worker thread, from what is taken here (pages held)."""
        store, state = self.server.store, self.server.state
        assert state is not None
        saves, tree = state.prepare_all()
        pages = [page for save in saves for page in save.pages]
        store.hold(pages)
        try:
            await trio.to_thread.run_sync(state.write_all, saves, tree, limiter=self._disk)
        finally:
            store.unhold(pages)

    async def save_file(self, file: KVFile) -> None:
        """fsync: write `file` through (--state) in a worker thread. What to write (its
        token ids, pages and the tree) is taken here, in the store's thread, and the pages
        held so that they are neither freed nor written meanwhile (a held page is shared:
        an append copies it first)."""
        store, state = self.server.store, self.server.state
        assert state is not None
        save = state.prepare(file)
        if save is None:
            return  # unlinked: it does not survive a restart
        tree = state.prepare_tree()
        store.hold(save.pages)
        try:
            await trio.to_thread.run_sync(state.write, save, tree, limiter=self._disk)
        finally:
            store.unhold(save.pages)

    async def verify_file(self, file: KVFile, cred: Cred) -> dict[str, Any]:
        """kv_verify for the user.kv.verify xattr, as `cred` (its uid's share and service;
        the file becomes computed only if `cred` may write it)."""
        from symphony.fs.nodes import W_OK
        from symphony.sched.tasks import Account
        from symphony.sched.verify import verify_file

        server = self.server
        account = Account(0, uid=cred.uid)
        may_adopt = file.allows(cred, W_OK)
        return await verify_file(
            server.engine, server.store, server.scheduler, account, file, may_adopt
        )

    def open_ctl(self, cred: Cred, pid: int, reading: bool) -> ControlSession:
        server = self.server
        assert server.syscalls is not None
        server.admission.admit(cred)  # a session counts as a connection of its uid
        proc = server.attach_client(pid, cred)

        def close() -> None:
            server.admission.release(cred)
            server.detach_client(proc)

        return ControlSession(
            server.syscalls,
            cred,
            proc,
            reading,
            self.ctl_waiters,
            after_call=self.cache.invalidate,
            on_close=close,
        )

    def sys_text(self, name: str, cred: Cred) -> str:
        """The text of /.sys/NAME (status, procs or metrics), as `cred` reads it."""
        server = self.server
        assert server.syscalls is not None
        st = server.syscalls.status()
        pages = st.pop("pages")
        if name == "procs":
            rows = [p.row() for p in sorted(server.procs.procs.values(), key=lambda p: p.pid)]
            lines = ["pid uid state priority tokens syscalls name"]
            lines += [
                f"{r['pid']} {r['uid']} {r['state']} {r['priority']} {r['tokens']} "
                f"{r['syscalls']} {r['name']}"
                for r in rows
            ]
        elif name == "metrics":  # Prometheus text exposition
            lines = ["# TYPE symphony_pages gauge"]
            lines += [f'symphony_pages{{state="{k}"}} {v}' for k, v in pages.items()]
            for key, kind in (
                ("files", "gauge"),
                ("processes", "gauge"),
                ("waiting", "gauge"),
                ("steps", "counter"),
                ("tokens_computed", "counter"),
            ):
                metric = f"symphony_{key}" + ("_total" if kind == "counter" else "")
                lines += [f"# TYPE {metric} {kind}", f"{metric} {st[key]}"]
        else:
            lines = [f"pages_{k} {v}" for k, v in pages.items()]
            lines += [f"{k} {v}" for k, v in st.items()]
            lines.append(self._invariants(fresh=cred.is_root))
        return "\n".join(lines) + "\n"

    def _invariants(self, fresh: bool) -> str:
        """The store's invariants: checked again for root (`fresh`), for others at most
        once a second (the check is O(files), and any user may read /.sys/status in a
        loop)."""
        now = time.monotonic()
        if fresh or now - self._checked[0] >= INVARIANTS_EVERY:
            try:
                self.server.store.check_invariants()
                verdict = "invariants ok"
            except AssertionError as exc:
                verdict = f"invariants broken: {exc}"
            self._checked = (now, verdict)
        return self._checked[1]


def clean_stale_mount(mountpoint: str) -> None:
    """Unmount what a killed server left at `mountpoint` (saying so in one line); refuse
    a mount point that is missing, not a directory, or served by a live server."""
    if importlib.util.find_spec("pyfuse3") is None:
        raise StoreError(errno.ENOSYS, "pyfuse3 is not installed: the store cannot be mounted")
    if not os.path.exists("/dev/fuse"):
        raise StoreError(errno.ENODEV, "this machine has no /dev/fuse: the store cannot be mounted")
    try:
        os.statvfs(mountpoint)  # asks the server behind a mount: never answered from a cache
    except FileNotFoundError:
        raise StoreError(errno.ENOENT, f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # "transport endpoint is not connected": stale
            raise
        print(f"symphony: cleaning up a stale mount at {mountpoint}", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
    if not os.path.isdir(mountpoint):
        raise StoreError(errno.ENOTDIR, f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise StoreError(errno.EBUSY, f"{mountpoint} is already mounted (another server?)")
