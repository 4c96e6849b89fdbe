"""The LIP registry: what a dead server left is ended; a live server's, or a planted
file's, is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from symphony.sched.lipregistry import WORKDIR_PREFIX, LipRegistry, LipTree
from symphony.sched.proctree import TOKEN_VAR, read_stat
from tests.spawn_helpers import alive, gone_within


@pytest.fixture
def left(tmp_path):
    """A registry at tmp_path/s.sock.lips naming a sleeping process and its workdir."""
    token = "t" * 32
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env={TOKEN_VAR: token}
    )
    st = read_stat(sleeper.pid)
    assert st is not None
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    path = str(tmp_path / "s.sock.lips")
    LipRegistry(path).add(LipTree(token, workdir, None, sleeper.pid, st.start_time))
    yield path, sleeper, workdir
    sleeper.kill()
    sleeper.wait(10)
    if os.path.exists(workdir):
        os.rmdir(workdir)


def as_left_by_a_dead_server(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    data["server"] = [os.getpid(), -1]  # this pid, another start: that server is gone
    with open(path, "w") as f:
        json.dump(data, f)


def test_a_live_servers_lips_are_left_alone(left):
    path, sleeper, workdir = left
    assert LipRegistry(path).end_leftovers() == 0  # written by this process, which runs
    assert alive(sleeper.pid) and os.path.isdir(workdir)


def test_a_dead_servers_lips_and_workdirs_are_ended(left):
    path, sleeper, workdir = left
    as_left_by_a_dead_server(path)
    assert LipRegistry(path).end_leftovers() == 1
    sleeper.wait(10)
    assert gone_within(sleeper.pid) and not os.path.exists(workdir)
    assert not os.path.exists(path)


def test_a_file_others_may_write_names_nothing_to_kill(left):
    path, sleeper, workdir = left
    as_left_by_a_dead_server(path)
    os.chmod(path, 0o666)
    assert LipRegistry(path).end_leftovers() == 0
    assert alive(sleeper.pid) and os.path.isdir(workdir)


def test_a_reused_pid_is_not_killed(left):
    path, sleeper, workdir = left
    as_left_by_a_dead_server(path)
    with open(path) as f:
        data = json.load(f)
    (tree,) = data["lips"].values()
    tree["start_time"] += 1  # the pid now names another process
    data["lips"] = {"u" * 32: tree}  # whose environment holds no such token
    with open(path, "w") as f:
        json.dump(data, f)
    assert LipRegistry(path).end_leftovers() == 0
    assert alive(sleeper.pid) and not os.path.exists(workdir)
