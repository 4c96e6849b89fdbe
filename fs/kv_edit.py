"""Editing the middle of a context: `drop_range` removes tokens [start, end) of a file.

The tokens after the range keep their K/V (computed when the range was there, as under
an attention mask that hides it from what comes next) and their positions, or with
`reposition` close the gap: they move down to where the range began, their keys turned
there by RoPE (StreamingLLM's attention sinks). Pages wholly before the range stay as
they are, shared or not; from the page holding `start` on, the kept tokens' K/V are
copied into new pages, so no page another file shares is written and the pages the
range filled go back to the pool.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar
from symphony.fs.nodes import KVFile

if TYPE_CHECKING:
    from symphony.fs.store import KVStore


def drop_range(
    store: KVStore, file: KVFile, start: int, end: int, holder: Holder, reposition: bool = False
) -> None:
    """Remove tokens [start, end) of `file`; new pages are charged to `holder`.

    With `reposition` the tokens after the range shift down by pos[end] - pos[start]:
    the first takes the position the first dropped token had, the rest keep their gaps.
    Their keys are turned to the new positions, which is not what computing them there
    afresh gives (they saw the range): the file stays custom from `start` on.

    Raises:
        StoreError: EINVAL for a range outside the file or a shifted position outside
            the model's, EBUSY while an append is in flight, ENOSPC when the pool cannot
            hold the copied tail, ENOTSUP to reposition in a store without the model's
            RoPE.
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
    grammar = None if file.grammar is None else _grammar_after(file.grammar, file, start, end)
    positions = file.position_list()
    shift = positions[start] - positions[end] if reposition else 0  # new - old, the tail's
    tail = [p + shift for p in positions[end:]]
    if shift:
        check_positions(store, tail)
    rotate = key_rotation(store) if shift else None
    head = start // ps  # pages wholly before the range: kept
    moved = [*range(head * ps, start), *range(end, n)]  # token indices copied, in order
    new_pages = store.allocate(-(-len(moved) // ps), holder)
    src = [file.pages[i // ps] * ps + i % ps for i in moved]
    dst = [new_pages[j // ps] * ps + j % ps for j in range(len(moved))]
    try:
        store.pool.copy_slots(src, dst)
        if rotate is not None:  # the tail's keys, in the file's own new pages
            rotated = dst[start - head * ps :]
            rotate(rotated, [shift] * len(rotated))
    except BaseException:
        store.pool.decref(new_pages)
        raise
    store.pool.decref(file.pages[head:])
    file.pages = [*file.pages[:head], *new_pages]
    gone = end - start
    kept = positions[:start] + tail
    file.positions = None if kept == list(range(len(kept))) else kept
    file.token_ids = file.token_ids[:start] + file.token_ids[end:]
    file.masks = _shifted_masks(file.masks, start, end)
    file.grammar = grammar
    file.custom_from = start if file.custom_from is None else min(file.custom_from, start)
    file.cached_tokens = min(file.cached_tokens, start)
    del file.page_hashes[head:]
    store.rehash(file)
    assert file.num_tokens == n - gone
    file.touch()


def check_positions(store: KVStore, positions: list[int]) -> None:
    """Raises: StoreError EINVAL unless every position is one the model has."""
    if positions and (min(positions) < 0 or max(positions) >= store.max_tokens):
        raise StoreError(
            errno.EINVAL,
            f"positions {min(positions)}..{max(positions)} are not all within the model's "
            f"0..{store.max_tokens - 1}",
        )


def key_rotation(store: KVStore) -> Callable[[Sequence[int], Sequence[int]], None]:
    """The store's way to move cached keys to new positions (Engine.rotate_keys).

    Raises:
        StoreError: ENOTSUP when the store was made without one.
    """
    if store.rotate_keys is None:
        raise StoreError(errno.ENOTSUP, "this store cannot move keys: it was made without RoPE")
    return store.rotate_keys


def _grammar_after(grammar: Grammar, file: KVFile, start: int, end: int) -> Grammar:
    """The file's grammar once tokens [start, end) go: before where it began, it moves
    down; over its tokens, a copy goes back to `start` and is fed what follows the range.

    Raises:
        StoreError: EINVAL when it refuses what is left (the file is not changed then).
    """
    if end <= grammar.start:
        twin = grammar.at(file.num_tokens)
        twin.start -= end - start
        return twin
    twin = grammar.at(start)
    twin.feed_checked(file.token_ids[end:], start)
    return twin


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
