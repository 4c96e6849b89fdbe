"""Editing the middle of a context: `drop_range` removes tokens [start, end) of a file.

The tokens after the range keep their positions and their K/V (computed when the range
was there, as under an attention mask that hides it from what comes next). Pages wholly
before the range stay as they are, shared or not; from the page holding `start` on, the
kept tokens' K/V are copied into new pages, so no page another file shares is written
and the pages the range filled go back to the pool.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.nodes import KVFile

if TYPE_CHECKING:
    from symphony.fs.store import KVStore


def drop_range(store: KVStore, file: KVFile, start: int, end: int, holder: Holder) -> None:
    """Remove tokens [start, end) of `file`; new pages are charged to `holder`.

    Raises:
        StoreError: EINVAL for a range outside the file, EBUSY while an append is in
            flight, ENOSPC when the pool cannot hold the copied tail.
    """
    n, ps = file.num_tokens, store.page_size
    if not 0 <= start <= end <= n:
        raise StoreError(errno.EINVAL, f"cannot drop [{start}, {end}) of a {n}-token file")
    if file.busy:
        raise StoreError(errno.EBUSY, "an append to this file is in flight")
    if start == end:
        return
    if end == n:  # nothing after the range: a truncate
        store.truncate_file(file, start)
        return
    head = start // ps  # pages wholly before the range: kept
    moved = [*range(head * ps, start), *range(end, n)]  # token indices copied, in order
    new_pages = store.allocate(-(-len(moved) // ps), holder)
    src = [file.pages[i // ps] * ps + i % ps for i in moved]
    dst = [new_pages[j // ps] * ps + j % ps for j in range(len(moved))]
    store.pool.copy_slots(src, dst)
    store.pool.decref(file.pages[head:])
    file.pages = [*file.pages[:head], *new_pages]
    gone = end - start
    positions = file.position_list()
    file.positions = positions[:start] + positions[end:]
    file.token_ids = file.token_ids[:start] + file.token_ids[end:]
    file.masks = _shifted_masks(file.masks, start, end)
    file.custom_from = start if file.custom_from is None else min(file.custom_from, start)
    file.cached_tokens = min(file.cached_tokens, start)
    del file.page_hashes[head:]
    store.rehash(file)
    assert file.num_tokens == n - gone
    file.touch()


def _shifted_masks(masks: dict[int, list[int]], start: int, end: int) -> dict[int, list[int]]:
    """The masks of the kept tokens, by their new indices, without the dropped range."""
    gone = end - start
    out: dict[int, list[int]] = {}
    for index, ranges in masks.items():
        if start <= index < end:
            continue
        kept: list[int] = []
        for s, e in zip(ranges[::2], ranges[1::2], strict=True):
            for a, b in ((s, min(e, start)), (max(s, end), e)):
                if a < b:
                    a, b = (a, b) if b <= start else (a - gone, b - gone)
                    if kept and kept[-1] == a:
                        kept[-1] = b
                    else:
                        kept += [a, b]
        out[index - gone if index >= end else index] = kept
    return out
