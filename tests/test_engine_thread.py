"""The engine thread (sched/engine_thread.py): one thread loads the engine and computes
every step, and while the server runs the trio thread computes its torch ops on one core."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio

from symphony.engine.engine import Engine
from symphony.lipctl import connect
from symphony.sched.engine_thread import EngineThread
from tests.conftest import make_tiny_engine
from tests.server_helpers import ServerThread


def record_steps(engine: Engine) -> list[threading.Thread]:
    """The thread of each `engine.step` from now on."""
    steps: list[threading.Thread] = []
    step = engine.step

    def recorded(chunks):  # type: ignore[no-untyped-def]
        steps.append(threading.current_thread())
        return step(chunks)

    engine.step = recorded  # type: ignore[method-assign]
    return steps


def test_jobs_run_in_order_on_one_thread_and_errors_reach_the_caller():
    thread = EngineThread()
    try:
        seen: list[int] = []

        def job(i: int) -> int:
            seen.append(i)
            return threading.get_ident()

        idents = [thread.call(job, i) for i in range(5)]
        assert seen == list(range(5))
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        assert thread.call(lambda: "still running") == "still running"  # an error ends no thread
    finally:
        thread.close()
    thread.close()  # twice is once
    with pytest.raises(RuntimeError, match="ended"):
        thread.call(lambda: None)


def test_a_cancelled_run_returns_only_once_its_job_has_ended():
    thread = EngineThread()
    ended = threading.Event()

    def slow_step() -> str:
        time.sleep(0.3)
        ended.set()
        return "done"

    async def main() -> tuple[bool, bool]:
        with trio.move_on_after(0.05) as scope:
            await thread.run(slow_step)
            await trio.sleep(10)  # the cancellation lands at the next checkpoint
        return scope.cancelled_caught, ended.is_set()

    try:
        assert trio.run(main) == (True, True)
        assert trio.run(thread.run, lambda: 6 * 7) == 42
    finally:
        thread.close()


def test_the_server_computes_every_step_on_the_thread_that_loaded_its_engine(tmp_path):
    thread = EngineThread()
    engine = thread.call(make_tiny_engine, 128, 4)
    steps = record_steps(engine)
    server = ServerThread(engine, str(tmp_path / "s.sock"), thread).start()
    try:
        with connect(server.server.config.socket_path) as lip:
            for i in range(4):  # tokenizing runs in trio's worker threads meanwhile
                kv = lip.kv(f"f{i}.kv", create=True)
                kv.append(lip.tokenize("once upon a time " * (i + 1)))
                kv.generate(max_tokens=6, temperature=0.0)
                kv.fork(f"g{i}.kv").generate(max_tokens=3, temperature=0.0)
            # the trio thread's own torch ops run on one core; the engine's on all
            assert server.run_sync(torch.get_num_threads) == 1
            assert thread.call(torch.get_num_threads) == thread.num_threads
    finally:
        server.stop()
        thread.close()
    assert server.error is None
    assert len(steps) >= 4 * 9
    assert {t.ident for t in steps} == {thread._thread.ident}


def test_a_server_without_a_thread_given_uses_one_of_its_own_and_ends_it(tmp_path):
    engine = make_tiny_engine(64, 4)
    steps = record_steps(engine)
    before = set(threading.enumerate())
    server = ServerThread(engine, str(tmp_path / "s.sock")).start()
    with connect(server.server.config.socket_path) as lip:
        kv = lip.kv("a.kv", create=True)
        kv.append(lip.tokenize("hello there"))
        kv.generate(max_tokens=5, temperature=0.0)
    server.stop()
    assert server.error is None
    assert len({t.ident for t in steps}) == 1 and steps[0].name == "symphony-engine"
    assert not steps[0].is_alive()
    assert server.server.scheduler.engine_thread is None
    leftover = [t for t in set(threading.enumerate()) - before if t.name == "symphony-engine"]
    assert leftover == []
