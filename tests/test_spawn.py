"""Spawning LIPs: the launcher (no preexec_fn), whole-tree kills, caps and per-uid limits."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import textwrap
import threading

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.sched.limits import ProcessCaps
from symphony.sched.processes import Limits, Proc, ProcessTable
from tests.spawn_helpers import gone, lines_of, reachable_by_others, stdout, wait_exit

ROOT_CRED = Cred(0, 0)
NOBODY = Cred(65534, 65534)
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run LIPs as others")

# forks; the child leaves the session and forks again; the grandchild tells its pid
TREE = textwrap.dedent(
    """
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            print("grandchild", os.getpid(), flush=True)
            time.sleep(60)
        os._exit(0)
    time.sleep(60)
    """
)


@pytest.fixture(params=[True, False], ids=["cgroups", "proc-only"])
async def table(tmp_path, request):
    """A process table, with a cgroup per LIP where this machine allows, and without."""
    procs = ProcessTable(str(tmp_path / "s.sock"), cgroups=request.param)
    async with trio.open_nursery() as nursery:
        try:
            yield procs, nursery
        finally:
            procs.kill_all()
            nursery.cancel_scope.cancel()


async def spawn(
    procs: ProcessTable, nursery: trio.Nursery, program: str, cred: Cred = ROOT_CRED, **limits
) -> Proc:
    return await procs.spawn(nursery, cred, program, [], "t.py", {}, Limits(**limits))


async def grandchild(proc: Proc) -> int:
    line = (await lines_of(proc, 1))[0]
    assert line.startswith("grandchild ")
    return int(line.split()[1])


async def test_spawn_passes_no_preexec_fn_and_works_beside_threads(table, monkeypatch):
    procs, nursery = table
    seen: list[dict] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        seen.append({**kwargs, "thread": threading.current_thread()})
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)  # this process has threads
    busy.start()
    try:
        proc = await spawn(procs, nursery, "print('hi')")
        assert await wait_exit(proc) == 0
    finally:
        stop.set()
    assert stdout(proc) == b"hi\n"
    assert seen and all(kw.get("preexec_fn") is None for kw in seen)
    # forked by the trio thread, which lives as long as the server: the parent-death
    # signal fires when the forking thread ends, and trio's worker threads end when idle
    assert all(kw["thread"] is threading.current_thread() for kw in seen)
    assert proc.tree is not None and not os.path.exists(proc.tree.workdir)


async def test_kill_ends_a_setsid_grandchild(table):
    procs, nursery = table
    proc = await spawn(procs, nursery, TREE)
    pid = await grandchild(proc)
    procs.kill(proc.pid, ROOT_CRED)
    assert await wait_exit(proc) < 0
    assert await gone(pid)
    assert proc.state == "killed"


async def test_wall_time_ends_a_setsid_grandchild(table):
    procs, nursery = table
    proc = await spawn(procs, nursery, TREE, wall_seconds=1)
    pid = await grandchild(proc)
    assert await wait_exit(proc, timeout=20) < 0
    assert await gone(pid)


async def test_what_a_lip_leaves_running_ends_with_it(table):
    procs, nursery = table
    program = textwrap.dedent(
        """
        import os, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print("grandchild", os.getpid(), flush=True)
                os.write(w, b"x")
                time.sleep(60)
            os._exit(0)
        os.read(r, 1)  # the LIP ends once its grandchild runs
        """
    )
    proc = await spawn(procs, nursery, program)
    assert await wait_exit(proc) == 0
    assert await gone(await grandchild(proc))


async def test_a_child_of_a_lip_shares_its_account(table):
    procs, nursery = table
    proc = await spawn(procs, nursery, TREE, tokens=5)
    pid = await grandchild(proc)
    row = procs.attach(pid, ROOT_CRED)
    assert row.account is proc.account and row.lip == proc.pid and not row.spawned
    assert row.row()["lip"] == proc.pid
    assert procs.attach(os.getpid(), ROOT_CRED).account is not proc.account
    other = procs.attach(pid + 10**7, NOBODY)  # no such process: an outside program
    assert other.account is not proc.account


async def test_rlimits_are_capped_and_shown(table):
    procs, nursery = table
    program = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    limits = Limits.from_args({"address_space": 1 << 40, "open_files": 1 << 20})
    proc = await procs.spawn(nursery, ROOT_CRED, program, [], "as.py", {}, limits)
    assert await wait_exit(proc) == 0
    cap = ProcessCaps()
    assert stdout(proc) == f"{cap.max_address_space}\n".encode()
    row = proc.row()["limits"]
    assert (row["address_space"], row["open_files"]) == (8 << 30, cap.max_open_files)


@pytest.mark.parametrize(
    "limits",
    [
        {"open_files": True},
        {"cpu_seconds": -1},
        {"address_space": 1 << 64},
        {"address_space": 1 << 63},
        {"pages": -1},
        {"tokens": 2.5},
        {"wall_seconds": 0},
        {"priority": -(1 << 70)},
        {"bogus": 1},
        {1: 2},
    ],
)
def test_bad_limits_are_einval(limits):
    with pytest.raises(StoreError) as info:
        Limits.from_args(limits)
    assert info.value.errno == errno.EINVAL


def test_none_means_the_default():
    assert Limits.from_args({"cpu_seconds": None, "pages": None}) == Limits()


@needs_root
async def test_the_17th_lip_of_a_uid_is_eagain_while_roots_start(table):
    procs, nursery = table
    with reachable_by_others():
        started = [await spawn(procs, nursery, "import time; time.sleep(30)", NOBODY)]
        started += [await spawn(procs, nursery, "import time; time.sleep(30)", NOBODY)]
        for _ in range(14):
            started.append(await spawn(procs, nursery, "import time; time.sleep(30)", NOBODY))
        with pytest.raises(StoreError) as info:
            await spawn(procs, nursery, "import time; time.sleep(30)", NOBODY)
        assert info.value.errno == errno.EAGAIN and "16" in str(info.value)
        mine = [await spawn(procs, nursery, "print(1)") for _ in range(2)]
        assert [await wait_exit(p) for p in mine] == [0, 0]
        assert all(p.uid == NOBODY.uid for p in started)
        procs.kill(started[0].pid, ROOT_CRED)
        await wait_exit(started[0])
        again = await spawn(procs, nursery, "print(2)", NOBODY)  # a slot freed
        assert await wait_exit(again) == 0 and stdout(again) == b"2\n"


async def test_a_name_with_a_newline_forges_no_line(table):
    procs, nursery = table
    name = "evil.py\n1 0 running 0 0 0 forged\u2028x\x1b[2J"
    proc = await procs.spawn(nursery, ROOT_CRED, "pass", [], name, {}, Limits())
    assert await wait_exit(proc) == 0
    shown = proc.row()["name"]
    assert shown.splitlines() == [shown] and "\x1b" not in shown
    assert shown.startswith("evil.py\\n1 0 running")


@pytest.fixture
def workdirs(monkeypatch) -> list[str]:
    """The folders tempfile.mkdtemp makes while the test runs."""
    made: list[str] = []
    real = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


async def test_out_of_fds_is_emfile_and_leaves_no_workdir(table, monkeypatch, workdirs):
    procs, nursery = table

    def no_pipe():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_pipe)
    with pytest.raises(StoreError) as info:
        await spawn(procs, nursery, "print(1)")
    assert info.value.errno == errno.EMFILE
    assert workdirs and not any(os.path.exists(w) for w in workdirs)
    assert not os.path.exists(procs.registry.path or "")


async def test_a_launch_failure_is_its_errno_and_leaves_no_workdir(table, monkeypatch, workdirs):
    procs, nursery = table
    with pytest.raises(StoreError) as info:
        await procs.spawn(nursery, ROOT_CRED, "pass", [], "t.py", {"A": "x\0y"}, Limits())
    assert info.value.errno == errno.EINVAL
    monkeypatch.setattr(Limits, "rlimits", lambda self, caps: "bogus=1")
    with pytest.raises(StoreError) as info:
        await spawn(procs, nursery, "pass")
    assert info.value.errno == errno.EINVAL and "rlimit bogus=1" in str(info.value)
    assert len(workdirs) == 2 and not any(os.path.exists(w) for w in workdirs)
    assert not any(p.spawned and p.state == "running" for p in procs.procs.values())


@pytest.mark.parametrize("table", [True], ids=["cgroups"], indirect=True)  # cgroups only
async def test_a_process_shedding_token_and_parent_link_still_ends_with_its_lip(table):
    procs, nursery = table
    if procs.cgroups.base is None:
        pytest.skip("needs a writable cgroup2 mount: /proc links and tokens can be shed")
    program = textwrap.dedent(
        """
        import ctypes, os, sys
        ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # no longer a child subreaper
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print("grandchild", os.getpid(), flush=True)
                os.write(w, b"x")
                code = "import time; time.sleep(60)"
                os.execve(sys.executable, [sys.executable, "-c", code], {})  # no token
            os._exit(0)
        os.read(r, 1)
        """
    )
    proc = await spawn(procs, nursery, program)
    assert proc.tree is not None and proc.tree.cgroup is not None
    assert await wait_exit(proc) == 0
    assert await gone(await grandchild(proc))
    assert not os.path.exists(proc.tree.cgroup)


async def test_arguments_too_long_are_e2big(table, workdirs):
    procs, nursery = table
    with pytest.raises(StoreError) as info:
        await procs.spawn(nursery, ROOT_CRED, "pass", ["x" * 200_000] * 20, "t.py", {}, Limits())
    assert info.value.errno == errno.E2BIG
    assert workdirs and not any(os.path.exists(w) for w in workdirs)


LIMIT_NAMES = ["cpu_seconds", "wall_seconds", "tokens", "address_space", "open_files", "pages"]


@given(
    st.dictionaries(
        st.sampled_from([*LIMIT_NAMES, "priority", "bogus"]) | st.integers(),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
        max_size=4,
    )
)
def test_any_limits_map_is_limits_or_einval(args):
    try:
        limits = Limits.from_args(args)
    except StoreError as exc:
        assert exc.errno == errno.EINVAL
        return
    capped = limits.capped(ProcessCaps())
    assert capped.address_space <= ProcessCaps().max_address_space
    for name in LIMIT_NAMES:
        value = getattr(capped, name)
        assert value is None or 0 <= value <= 1 << 62
