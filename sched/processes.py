"""The process table: LIPs the server spawned, and outside programs known by peer pid."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import subprocess
import tempfile

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.sched.cgroups import Cgroups, cgroup_of
from symphony.sched.limits import Limits, ProcessCaps
from symphony.sched.lipregistry import WORKDIR_PREFIX, LipRegistry, LipTree
from symphony.sched.proc import MAX_OUTPUT, Proc, process_name
from symphony.sched.proctree import TOKEN_VAR, ancestors, read_stat, token_of
from symphony.sched.spawner import spawn_error, start_child
from symphony.sched.tasks import Account

__all__ = ["Limits", "Proc", "ProcessCaps", "ProcessTable"]

log = logging.getLogger(__name__)

OUTPUT_GRACE = 5.0  # seconds to read what an ended LIP's pipes still hold


class ProcessTable:
    """Who is connected and what the server runs; spawn, kill, wait.

    Args:
        socket_path: told to programs as SYMPHONY_SOCKET.
        mount: told to programs as SYMPHONY_MOUNT.
        caps: the most any LIP gets, and how many LIPs one uid may run.
        registry: the file naming this server's LIPs (default: SOCKET.lips beside the
            socket); LIPs and workdirs an earlier server left there are ended here.
        cgroups: put each LIP in a cgroup of its own where the server may make them.
    """

    def __init__(
        self,
        socket_path: str,
        mount: str | None = None,
        caps: ProcessCaps | None = None,
        registry: str | None = None,
        cgroups: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.mount = mount
        self.caps = caps if caps is not None else ProcessCaps()
        self.procs: dict[int, Proc] = {}
        self._by_token: dict[str, Proc] = {}
        self._by_cgroup: dict[str, Proc] = {}  # as /proc/PID/cgroup names it
        self._starting: dict[int, int] = {}  # uid -> spawns in progress
        # where tree kills run in a worker thread: a scan of /proc is O(processes), and a
        # LIP may have thousands (the nursery spawns were given)
        self._background: trio.Nursery | None = None
        self.cgroups = Cgroups(cgroups)
        self.registry = LipRegistry(registry if registry is not None else socket_path + ".lips")
        self.registry.end_leftovers()

    def attach(self, pid: int, cred: Cred) -> Proc:
        """The process a new connection belongs to: a spawned LIP, or an outside program.

        A process of a LIP's tree (its forked child, or one that left its session) gets
        its own row sharing the LIP's Account, so the LIP's quotas cover it.
        """
        proc = self.procs.get(pid)
        if proc is None or proc.state != "running":
            lip = self._lip_of(pid, cred)
            account = lip.account if lip is not None else Account(pid, uid=cred.uid)
            proc = Proc(pid, cred.uid, cred.gid, process_name(pid), account, spawned=False)
            proc.lip = lip.pid if lip is not None else None
            self.procs[pid] = proc
        return proc

    def _lip_of(self, pid: int, cred: Cred) -> Proc | None:
        """The running LIP whose tree `pid` is in (by cgroup, parent links or token), if
        it runs as the same uid."""
        cgroup = cgroup_of(pid)
        candidates = [self._by_cgroup.get(cgroup) if cgroup else None]
        candidates += [self.procs.get(p) for p in ancestors(pid)]
        token = token_of(pid)
        candidates.append(self._by_token.get(token) if token else None)
        for lip in candidates:
            if lip is not None and lip.spawned and lip.state == "running" and lip.uid == cred.uid:
                return lip
        return None

    def detach(self, proc: Proc) -> None:
        """An outside program's last connection closed: it leaves the table."""
        if not proc.spawned:
            proc.state = "exited"
            self._forget(proc)

    def _forget(self, proc: Proc) -> None:
        """Remove `proc`'s row, and only its: by now its pid may name another's."""
        pid = proc.pid
        if self.procs.get(pid) is proc:
            del self.procs[pid]

    def running_lips(self, uid: int) -> int:
        return sum(p.spawned and p.state == "running" and p.uid == uid for p in self.procs.values())

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

        rlimits are lowered to the server's caps. The program runs in its own session,
        through sched/launcher.py (no `preexec_fn`), and dies with the server.

        Raises:
            StoreError: EPERM when the server cannot take on that uid (it is not root
                and the caller is another user); EAGAIN when the uid runs its most LIPs
                or the machine cannot start one; EMFILE when the server is out of file
                descriptors; EINVAL when the launcher refuses the limits.
        """
        if os.getuid() != 0 and cred.uid != os.getuid():
            raise StoreError(
                errno.EPERM,
                "this server does not run as root: it runs programs of its own user only",
            )
        most = self.caps.max_lips_per_uid
        starting = self._starting.get(cred.uid, 0)  # spawns of the uid awaiting their exec
        if not cred.is_root and self.running_lips(cred.uid) + starting >= most:
            raise StoreError(
                errno.EAGAIN,
                f"uid {cred.uid} already runs {most} programs, the most this server allows "
                "one user (lipctl serve --max-lips-per-uid); wait for one to end",
            )
        self._starting[cred.uid] = starting + 1
        try:
            return await self._spawn(nursery, cred, program, args, name, env, limits)
        finally:
            self._starting[cred.uid] -= 1
            if not self._starting[cred.uid]:
                del self._starting[cred.uid]

    async def _spawn(
        self,
        nursery: trio.Nursery,
        cred: Cred,
        program: str,
        args: list[str],
        name: str,
        env: dict[str, str],
        limits: Limits,
    ) -> Proc:
        limits = limits.capped(self.caps)
        tree = self._make_tree(cred, program)
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tree.workdir,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **env,
            "SYMPHONY_SOCKET": self.socket_path,
            **({"SYMPHONY_MOUNT": self.mount} if self.mount else {}),
            "PYTHONUNBUFFERED": "1",
            TOKEN_VAR: tree.token,
        }

        account = Account(
            0, limits.priority, page_quota=limits.pages, token_quota=limits.tokens, uid=cred.uid
        )
        proc = Proc(0, cred.uid, cred.gid, name, account, spawned=True)
        proc.tree, proc.limits = tree, limits

        def before_exec(pid: int) -> None:  # the launcher waits: nothing of it runs yet
            st = read_stat(pid)
            tree.pid, tree.start_time = pid, (st.start_time if st is not None else None)
            if tree.cgroup is not None:
                try:
                    self.cgroups.enter(tree.cgroup, pid)
                except OSError as exc:
                    log.warning("pid %d runs without its cgroup: %s", pid, exc)
                    Cgroups.remove(tree.cgroup)
                    tree.cgroup = None
            self.registry.add(tree)
            # in the table before it can run: its first connection, which may come
            # while this task still waits on the launcher, must find it (found
            # missing, it got a row of its own, with its own quotas, whose detach
            # later removed the LIP's row: `wait` said ESRCH)
            proc.pid = account.pid = pid
            self.procs[pid] = proc
            self._by_token[tree.token] = proc
            if tree.cgroup is not None and (relative := self.cgroups.relative(tree.cgroup)):
                self._by_cgroup[relative] = proc

        try:
            child = await start_child(
                [os.path.join(tree.workdir, "program.py"), *args],
                cred,
                tree.workdir,
                child_env,
                limits.rlimits(self.caps),
                before_exec,
            )
        except BaseException:
            self._forget(proc)
            self._by_token.pop(tree.token, None)
            if tree.cgroup is not None:
                self._by_cgroup.pop(self.cgroups.relative(tree.cgroup) or "", None)
            tree.end()
            tree.remove()
            self.registry.remove(tree.token)
            raise
        proc.child = child
        self._background = nursery
        nursery.start_soon(self._supervise, proc, limits.wall_seconds)
        return proc

    def _make_tree(self, cred: Cred, program: str) -> LipTree:
        """A fresh workdir owned by the caller holding program.py, and a cgroup where
        cgroups are on; both written down before anything else."""
        token = secrets.token_hex(16)
        try:
            tree = LipTree(token, tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        except OSError as exc:
            raise spawn_error(exc) from None
        tree.cgroup = self.cgroups.create(token)
        self.registry.add(tree)
        try:
            path = os.path.join(tree.workdir, "program.py")
            with open(path, "w") as f:
                f.write(program)
            if os.getuid() == 0:
                os.chown(tree.workdir, cred.uid, cred.gid)
                os.chown(path, cred.uid, cred.gid)
        except OSError as exc:
            tree.remove()
            self.registry.remove(token)
            raise spawn_error(exc) from None
        return tree

    async def _supervise(self, proc: Proc, wall_seconds: int | None) -> None:
        child = proc.child
        assert child is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, proc, 1, child.stdout)
                nursery.start_soon(self._pump, proc, 2, child.stderr)
                with trio.move_on_after(wall_seconds if wall_seconds is not None else math.inf):
                    await child.wait()
                if child.popen.returncode is None:  # over its wall-time limit
                    log.warning(
                        "pid %d (%s) ran past %s s: killed", proc.pid, proc.name, wall_seconds
                    )
                    self.kill(proc.pid, Cred(0, 0))
                status = await child.wait()
                # what its tree left running goes too (then its pipes close); one that
                # escaped the tree may hold them open: its output is not waited for long
                await trio.to_thread.run_sync(self._end_tree, proc)
                nursery.cancel_scope.deadline = trio.current_time() + OUTPUT_GRACE
        finally:
            child.close()  # cancelled (the server stops): kill_all ends the rest
        proc.exit_status = status
        if proc.state == "running":
            proc.state = "killed" if status < 0 else "exited"
        cgroup = proc.tree.cgroup if proc.tree is not None else None
        with trio.move_on_after(OUTPUT_GRACE):  # killed processes take a moment to leave
            while cgroup is not None and Cgroups.populated(cgroup):
                await trio.sleep(0.01)
        self._cleanup(proc)
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
        """SIGKILL a spawned program and its whole tree.

        Raises:
            StoreError: ESRCH for a pid this server did not spawn, EPERM for another
                user's program.
        """
        proc = self.procs.get(pid)
        if proc is None or not proc.spawned:
            raise StoreError(errno.ESRCH, f"no program {pid} run by this server")
        if not cred.is_root and cred.uid != proc.uid:
            raise StoreError(errno.EPERM, f"program {pid} belongs to uid {proc.uid}")
        if proc.state == "running":
            proc.state = "killed"
            if self._background is not None:
                self._background.start_soon(trio.to_thread.run_sync, self._end_tree, proc)
            else:
                self._end_tree(proc)
        return proc

    def _end_tree(self, proc: Proc) -> None:
        """SIGKILL the LIP (unless reaped already) and every process of its tree."""
        if proc.tree is not None and proc.child is not None:
            # while unreaped, its pid cannot name another process
            proc.tree.end(main_alive=proc.child.popen.returncode is None)

    def _cleanup(self, proc: Proc) -> None:
        tree = proc.tree
        if tree is None:
            return
        self._by_token.pop(tree.token, None)
        if tree.cgroup is not None:
            self._by_cgroup.pop(self.cgroups.relative(tree.cgroup) or "", None)
        if tree.remove():
            self.registry.remove(tree.token)
        # else its cgroup stays busy: the registry keeps it for the next start

    def reap_finished(self, keep: int = 100) -> None:
        """Forget the oldest finished programs beyond `keep`."""
        done = [p for p in self.procs.values() if p.spawned and p.state != "running"]
        for proc in sorted(done, key=lambda p: p.started)[:-keep]:
            del self.procs[proc.pid]

    def kill_all(self) -> None:
        """The server stops: end every running LIP's tree, reap it, remove its workdir."""
        for proc in self.procs.values():
            if proc.spawned and proc.state == "running":
                proc.state = "killed"
                self._end_tree(proc)
                if proc.child is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.exit_status = proc.child.popen.wait(timeout=5)
                self._cleanup(proc)
