"""Starting one LIP process through sched/launcher.py, and waiting for it, under trio."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
LAUNCH_TIMEOUT = 30.0  # seconds for the launcher to exec the program (it takes milliseconds)


@dataclass
class SpawnedChild:
    """A running LIP: its Popen, the pipes of its output, a pidfd to wait on."""

    popen: subprocess.Popen[bytes]
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream
    pidfd: int | None

    async def wait(self) -> int:
        """Its exit status once it ends (negative: the signal that ended it)."""
        while self.popen.poll() is None:
            if self.pidfd is not None:
                await trio.lowlevel.wait_readable(self.pidfd)
            else:  # a kernel without pidfds
                await trio.sleep(0.05)
        return self.popen.returncode

    def close(self) -> None:
        if self.pidfd is not None:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


async def start_child(
    argv: list[str],
    cred: Cred,
    workdir: str,
    env: dict[str, str],
    rlimits: str,
    before_exec: Callable[[int], None] | None = None,
) -> SpawnedChild:
    """Run `python ARGV` as `cred` (when the server is root) in a new session, with the
    launcher's `rlimits`; returns once the program itself runs. `before_exec(pid)` is
    called while the launcher waits, before it execs the program.

    Raises:
        StoreError: EMFILE when the server is out of file descriptors; EINVAL for a NUL
            in an argument or the environment, or limits the launcher refuses; E2BIG
            for arguments too long; EAGAIN for any other failure to start.
    """
    fds: list[int] = []
    try:
        for _ in range(4):
            fds.extend(os.pipe())
    except OSError as exc:
        _close(fds)
        raise spawn_error(exc) from None
    out_r, out_w, err_r, err_w, status_r, status_w, go_r, go_w = fds
    command = [sys.executable, "-I", "-S", LAUNCHER, str(os.getpid()), str(status_w), str(go_r)]
    command += [rlimits, "--", sys.executable, *argv]
    who = {"user": cred.uid, "group": cred.gid, "extra_groups": []} if os.getuid() == 0 else {}
    try:
        # Called here in the trio thread, not in a worker thread as trio's open_process
        # does: the launcher's parent-death signal fires when the forking *thread*
        # ends, and trio's worker threads end when idle; the trio thread lives as long
        # as the server. Popen without preexec_fn forks safely from a threaded process.
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            pass_fds=(status_w, go_r),
            cwd=workdir,
            env=env,
            start_new_session=True,
            **who,
        )
    except OSError as exc:
        _close([out_r, err_r, status_r, go_w])
        raise spawn_error(exc) from None
    except ValueError as exc:  # a NUL in an argument, a bad environment variable name
        _close([out_r, err_r, status_r, go_w])
        raise StoreError(errno.EINVAL, f"cannot start the program: {exc}") from None
    except subprocess.SubprocessError as exc:
        _close([out_r, err_r, status_r, go_w])
        raise StoreError(errno.EAGAIN, f"cannot start the program: {exc}") from None
    finally:
        _close([out_w, err_w, status_w, go_r])
    stdout, stderr = trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)
    failure = None
    try:
        if before_exec is not None:
            before_exec(popen.pid)
        os.write(go_w, b"g")
    except (OSError, StoreError) as exc:  # EOF on go: the launcher exits
        failure = exc if isinstance(exc, StoreError) else spawn_error(exc)
    finally:
        _close([go_w])
    failure = await _launch_status(popen, status_r) or failure
    if failure is not None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            popen.kill()
            popen.wait(timeout=5)
        await stdout.aclose()
        await stderr.aclose()
        raise failure
    try:
        pidfd: int | None = os.pidfd_open(popen.pid)
    except OSError:
        pidfd = None
    return SpawnedChild(popen, stdout, stderr, pidfd)


async def _launch_status(popen: subprocess.Popen[bytes], status_r: int) -> StoreError | None:
    """None once the launcher has exec'd the program; else why it did not."""
    message = b""
    # shielded: once started, the program must be either running and known, or gone
    with trio.CancelScope(shield=True), trio.move_on_after(LAUNCH_TIMEOUT) as timer:
        async with trio.lowlevel.FdStream(status_r) as status:
            while data := await status.receive_some(4096):
                message += data
    if timer.cancelled_caught:
        return StoreError(errno.EAGAIN, "cannot start the program: its launcher hung")
    if not message:
        return None
    name, _, sentence = message.decode(errors="replace").partition(" ")
    code = getattr(errno, name, errno.EAGAIN) if name.startswith("E") else errno.EAGAIN
    if code == errno.EIO:
        code = errno.EAGAIN
    return StoreError(code, f"cannot start the program: {sentence}")


def spawn_error(exc: OSError) -> StoreError:
    """The errno a caller gets when the server cannot make what a spawn needs."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return StoreError(
            errno.EMFILE, "the server is out of file descriptors: cannot start the program"
        )
    if exc.errno == errno.E2BIG:
        return StoreError(errno.E2BIG, "the program's arguments and environment are too long")
    return StoreError(errno.EAGAIN, f"cannot start the program: {exc.strerror or exc}")


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
