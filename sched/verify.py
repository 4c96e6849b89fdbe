"""kv_verify: recompute a KV file and say how far its K/V are from the engine's own.

An imported file's K/V are whatever its bytes said. Verifying recomputes its tokens in a
nameless scratch file, compares every filled slot of every layer, and when the largest
deviation is within the engine's tolerance the file takes the recomputed pages: it is
then "computed", bit for bit this engine's, and its full pages may enter the index.
"""

from __future__ import annotations

from typing import Any

import torch

from symphony.engine.engine import Engine
from symphony.fs.nodes import COMPUTED, KVFile
from symphony.fs.store import KVStore
from symphony.sched.scheduler import Scheduler
from symphony.sched.tasks import Account, Task


def tolerance(engine: Engine) -> float:
    """How far a recomputation of the same tokens may drift (chunking, batch shapes)."""
    return 1e-3 if engine.config.torch_kv_dtype == torch.float32 else 3e-2


def relative_slack(engine: Engine) -> float:
    """What a value may differ by beyond `tolerance`, relative to itself: on a CPU with
    bf16 pages under fp32 math, one rounding step of bf16 (2^-7 of a value at most),
    which a last-bit difference of the fp32 value before rounding can cost."""
    config = engine.config
    return 2.0**-7 if config.torch_kv_dtype != config.torch_dtype else 0.0


async def verify_file(
    engine: Engine,
    store: KVStore,
    scheduler: Scheduler,
    account: Account,
    file: KVFile,
    may_adopt: bool,
) -> dict[str, Any]:
    """Recompute `file` and report; adopt the recomputed pages when they match and the
    caller `may_adopt` (may write the file: adopting changes its pages and origin).

    Raises:
        StoreError: ENOSPC when the pool cannot hold the recomputation, EBUSY when the
            file changed meanwhile, a quota's error.
    """
    num_tokens = file.num_tokens
    report: dict[str, Any] = {
        "tokens": num_tokens,
        "tolerance": tolerance(engine),
        "relative_tolerance": relative_slack(engine),
    }
    if not num_tokens:
        return {**report, "max_abs_diff": 0.0, "match": True, "origin": file.origin}
    scratch = store.scratch_file(file.domain)
    pages = list(file.pages)
    store.hold(pages)  # the file may be rolled back meanwhile: its pages stay readable
    file.open_count += 1  # unlinked meanwhile, it stays until the report
    try:
        # at the file's own positions, under the causal mask (masks are not stored)
        task = Task(account, scratch, list(file.token_ids))
        task.positions = None if file.positions is None else list(file.positions)
        scheduler.submit(task)
        try:
            await task.done.wait()
        finally:
            scheduler.cancel(task)
        if task.error is not None:
            raise task.error
        thread = scheduler.engine_thread
        assert thread is not None  # the scheduler runs: the task above was computed
        diff, beyond = await thread.run(
            engine.pool.deviation, pages, scratch.pages, num_tokens, relative_slack(engine)
        )
        match = beyond <= report["tolerance"]
        if match and may_adopt and file.origin != COMPUTED:
            store.adopt_pages(file, scratch)
    finally:
        store.unhold(pages)
        store.close(scratch)
        store.close(file)
    return {**report, "max_abs_diff": diff, "match": match, "origin": file.origin}
