"""A program's scratch files: named under one run's stem in a folder, and removed together,
even when the program is cancelled.

A program that forks or concatenates files may be cancelled while one is being made on
the server, before its name came back; so its files are found by name: every name in
the folder that begins with the run's id and a dash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

from symphony.lipctl.aio import AsyncLip
from symphony.lipctl.wire import SymphonyError


async def remove_run(lip: AsyncLip, folder: str, run_id: str) -> None:
    """Unlink every file of run `run_id` in `folder` ("RUN_ID-...")."""
    await remove_where(lip, folder, lambda name: name.startswith(f"{run_id}-"))


async def remove_where(lip: AsyncLip, folder: str, doomed: Callable[[str], bool]) -> int:
    """Unlink the files in `folder` whose names `doomed` picks; returns how many went.
    Shielded from a cancel, and each on its own: one that fails (gone meanwhile, not a
    KV file) does not keep the others."""
    removed = 0
    with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
        for name in await lip.listdir(folder):
            if doomed(name):
                with contextlib.suppress(SymphonyError):
                    await lip.call("kv_unlink", path=f"{folder}/{name}")
                    removed += 1
    return removed
