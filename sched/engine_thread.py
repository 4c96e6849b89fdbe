"""The engine thread: one OS thread that loads the model and computes every step.

Always the same thread, because of how torch's OpenMP runtime (libgomp) waits. Each
thread that runs a parallel region keeps a team of worker threads of its own, and once
the process holds more such workers than cores, every worker stops spinning between
regions and sleeps on a futex instead. trio's worker threads are a cache, not one
thread, and the model used to load in the main thread: on 2 cores an 8-sequence decode
step cost twice what the engine alone takes (137 against 68 ms, 800 context switches a
step), and one long kv_drop on the trio thread was enough to make it so for good.

So the engine is built here (`call`) and driven from trio (`run`), one job at a time in
order; and while the server runs, the trio thread computes its own torch work (a
kv_drop's copies, say) on one core (`alone_in_parallel`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import outcome
import torch
import trio

T = TypeVar("T")


class EngineThread:
    """Runs jobs one at a time, in the order given, on one thread of its own."""

    def __init__(self, num_threads: int | None = None, name: str = "symphony-engine") -> None:
        # torch's threads for this thread's parallel regions, fixed before any runs
        self.num_threads = num_threads or torch.get_num_threads()
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # a job is queued before the end, or refused
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            # torch keeps this count per thread, and per library that parallelizes (each
            # sets its own from the process's default on first use): kept as it was
            if torch.get_num_threads() != self.num_threads:
                torch.set_num_threads(self.num_threads)
            job()

    def _submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine thread has ended")
            self._jobs.put(job)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine thread, waiting for it (blocking: not from trio)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: Future[T] = Future()

        def job() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller's to see, not this thread's end
                future.set_exception(exc)

        self._submit(job)
        return future.result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """From trio: `fn(*args)` on the engine thread, after the jobs queued before it.
        Cancelling waits for it to end all the same (a step half done cannot be left):
        the cancellation lands at the caller's next checkpoint."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []

        def job() -> None:
            result.append(outcome.capture(fn, *args))
            with contextlib.suppress(trio.RunFinishedError):  # nobody waits any more
                token.run_sync_soon(done.set)

        self._submit(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        return result[0].unwrap()

    @contextlib.contextmanager
    def alone_in_parallel(self) -> Iterator[None]:
        """Within, the calling thread runs its torch ops on one core, so that it keeps
        no team of OpenMP workers beside the engine thread's. Blocks until the engine
        thread is free: enter it before steps run."""
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)  # this thread's count, and the process's default
            self.call(torch.set_num_threads, self.num_threads)  # the default: the engine's
            yield
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        """End the thread after the jobs queued before this; waits for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
