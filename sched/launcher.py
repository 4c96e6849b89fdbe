"""Starts one LIP: parent-death signal, subreaper, rlimits, then exec of the program.

Run by the server as `python -I -S launcher.py SERVER_PID STATUS_FD GO_FD LIMITS -- ARGV...`
after subprocess has set the uid, gid, groups and session. It is a script with only
the standard library (never imported by the package) so that nothing but a bare
interpreter runs between the fork and the LIP's exec: the server itself runs torch and
trio threads, where `preexec_fn` may deadlock the child.

LIMITS is `name=value,...` over `cpu`, `as`, `nofile` and `nproc` (soft = hard).
STATUS_FD is the write end of a pipe: it closes on exec (the LIP runs) or carries
`ERRNO_NAME sentence` when the launch failed, and the launcher exits with 127.
GO_FD is the read end of a pipe: the launcher execs once it reads a byte there (the
server has put it in its cgroup and written it down), and exits if it reads EOF.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from typing import NoReturn

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
}


def fail(status_fd: int, code: int, message: str) -> NoReturn:
    name = errno.errorcode.get(code, "EIO")
    try:
        os.write(status_fd, f"{name} {message}".encode(errors="replace"))
    finally:
        os._exit(127)


def prctl(libc: ctypes.CDLL, option: int, value: int) -> int:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        return ctypes.get_errno()
    return 0


def main(argv: list[str]) -> NoReturn:
    server_pid, status_fd, go_fd, limits, separator, *program = argv
    fd = int(status_fd)
    if separator != "--" or not program:
        fail(fd, errno.EINVAL, "usage: launcher.py SERVER_PID STATUS_FD GO_FD LIMITS -- ARGV")
    libc = ctypes.CDLL(None, use_errno=True)
    # The kernel sends the signal when the *thread* that forked us ends, not the
    # process: the server forks from its trio thread, which lives as long as the server
    # (never from trio's worker threads, which come and go).
    code = prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
    if code:
        fail(fd, code, "cannot set the parent-death signal")
    if os.getppid() != int(server_pid):  # the server died before prctl: nobody to die with
        os._exit(137)
    # Orphans of the LIP (a double fork, a setsid child) stay below it, where the
    # server finds them by parent links, instead of moving to init.
    code = prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
    if code:
        fail(fd, code, "cannot make the program a child subreaper")
    for item in filter(None, limits.split(",")):
        key, _, value = item.partition("=")
        try:
            resource.setrlimit(RLIMITS[key], (int(value), int(value)))
        except (KeyError, ValueError, OSError) as exc:
            fail(fd, errno.EINVAL, f"cannot set the rlimit {item}: {exc}")
    try:
        go = os.read(int(go_fd), 1)
    except OSError as exc:
        fail(fd, exc.errno or errno.EIO, "cannot read the server's go")
    if not go:  # the server gave up on this launch, or died
        os._exit(137)
    os.close(int(go_fd))
    os.set_inheritable(fd, False)  # close-on-exec: EOF tells the server the exec worked
    try:
        os.execv(program[0], program)
    except OSError as exc:
        fail(fd, exc.errno or errno.EIO, f"cannot run {program[0]}: {exc.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
