"""Building a context from pieces: `concat_files` makes a new KV file holding the tokens
of several files, one after another (Prompt Cache's modules).

Each piece keeps the K/V it was computed with, alone: attention across pieces is not
what computing the whole context would give, so the new file is custom from its second
piece on (never indexed, never fed from the index). With `reposition` each piece moves
to follow the one before (its first token at the previous piece's last position + 1),
its keys turned there by RoPE. A piece that lands on a page boundary unmoved shares its
whole pages with its source, copy-on-write as a fork does; the other tokens' K/V are
copied into new pages of the file.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.kv_edit import check_positions, key_rotation
from symphony.fs.nodes import COMPUTED, R_OK, W_OK, X_OK, Cred, KVFile

if TYPE_CHECKING:
    from symphony.fs.store import KVStore

MAX_SOURCES = 64


@dataclass(frozen=True)
class Piece:
    """One source as it lands in the new file."""

    file: KVFile
    offset: int  # the new file's index of the piece's first token
    shift: int  # new position - old position, the same for each of its tokens
    num_shared: int  # its leading pages the new file shares; its other tokens are copied


def concat_files(
    store: KVStore,
    dst: str,
    srcs: Sequence[str],
    cred: Cred,
    reposition: bool,
    mode: int,
    holder: Holder,
) -> KVFile:
    """Make the file `dst` (mode `mode`) hold the tokens of `srcs` in order; new pages,
    and shared pages of another uid's, are charged to `holder` (as kv_fork does).

    Raises:
        StoreError: EINVAL for no sources or more than MAX_SOURCES, a result longer than
            the context or with a position past the model's; ENOENT, EACCES (each source
            must be readable); EBUSY while an append to a source is in flight; EEXIST
            when `dst` exists; ENOSPC when the pool or `holder`'s bounds are short (then
            nothing is made and nothing taken); ENOTSUP to reposition in a store made
            without RoPE.
    """
    if not 1 <= len(srcs) <= MAX_SOURCES:
        raise StoreError(errno.EINVAL, f"{len(srcs)} sources; a concat takes 1..{MAX_SOURCES}")
    files = [store.ns.lookup_file(path, cred, R_OK) for path in srcs]
    busy = next((path for path, f in zip(srcs, files, strict=True) if f.busy), None)
    if busy is not None:
        raise StoreError(errno.EBUSY, f"an append to {busy} is in flight")
    total = sum(f.num_tokens for f in files)
    if total > store.max_tokens:
        raise StoreError(errno.EINVAL, f"{total} tokens exceed the context of {store.max_tokens}")
    _refuse_existing(store, dst, cred)
    pieces = _layout([f for f in files if f.num_tokens], store.page_size, reposition)
    positions = [p + piece.shift for piece in pieces for p in piece.file.position_list()]
    check_positions(store, positions)
    rotate = key_rotation(store) if any(piece.shift for piece in pieces) else None

    ps = store.page_size
    shared = [page for piece in pieces for page in piece.file.pages[: piece.num_shared]]
    new_pages = store.allocate(-(-total // ps) - len(shared), holder)
    table = _page_table(pieces, ps, new_pages)
    src, dst_slots, shifts = _copied_slots(pieces, ps, table)
    try:
        taken = store.charges.foreign(shared, holder)  # kept alive by `holder` from now on
        over = store.charges.over(holder, len(taken))
        if over is not None:
            raise StoreError(errno.ENOSPC, over[2])
        store.pool.copy_slots(src, dst_slots)
        if rotate is not None:
            moved = [(slot, s) for slot, s in zip(dst_slots, shifts, strict=True) if s]
            rotate([slot for slot, _ in moved], [s for _, s in moved])
        file = store.ns.create_file(dst, cred, mode, store.domain_of(cred))
    except BaseException:
        store.pool.decref(new_pages)
        raise
    store.charges.transfer(taken, holder)
    store.pool.incref(shared)
    file.pages = table
    file.token_ids = [t for piece in pieces for t in piece.file.token_ids]
    file.positions = None if positions == list(range(total)) else positions
    file.masks = {
        piece.offset + index: [r + piece.offset for r in ranges]
        for piece in pieces
        for index, ranges in piece.file.masks.items()
    }
    # a piece after the first was computed without what now comes before it
    starts = [piece.offset for piece in pieces[1:]]
    starts += [p.offset + p.file.custom_from for p in pieces if p.file.custom_from is not None]
    file.custom_from = min(starts, default=None)
    file.cached_tokens = pieces[0].file.cached_tokens if pieces else 0
    file.origin = next((p.file.origin for p in pieces if p.file.origin != COMPUTED), COMPUTED)
    # its plain pages are its first source's, indexed there already; as for a fork, they
    # are not listed again under another domain
    store.rehash(file, index=False)
    file.touch()
    return file


def _refuse_existing(store: KVStore, path: str, cred: Cred) -> None:
    """EEXIST, or a folder the caller may not make files in, before any work rather
    than after copying (create_file checks again)."""
    try:
        store.ns.lookup(path, cred)
    except StoreError:
        # missing: the caller must be able to make it (EACCES, ENOENT, ENOTDIR now)
        parent, _ = store.ns.parent_of(path, cred)
        store.ns.check(parent, cred, W_OK | X_OK, path)
        return
    raise StoreError(errno.EEXIST, f"file exists: {path}")


def _layout(files: list[KVFile], page_size: int, reposition: bool) -> list[Piece]:
    """Where each (non-empty) file lands, how far it moves, which of its pages are shared:
    its whole pages when it lands on a page boundary unmoved, and its partial last page
    too when it is the last piece (an append copies a shared partial page first)."""
    pieces: list[Piece] = []
    offset, last = 0, None  # the previous piece's last position, once moved
    for i, file in enumerate(files):
        first = file.positions[0] if file.positions else 0
        shift = last + 1 - first if reposition and last is not None else 0
        if shift or offset % page_size:
            num_shared = 0
        elif i == len(files) - 1:
            num_shared = len(file.pages)
        else:
            num_shared = file.num_tokens // page_size
        pieces.append(Piece(file, offset, shift, num_shared))
        offset += file.num_tokens
        last = file.next_position - 1 + shift
    return pieces


def _page_table(pieces: list[Piece], page_size: int, new_pages: list[int]) -> list[int]:
    """The new file's pages: each piece's shared pages where it lands, new ones around."""
    total = sum(piece.file.num_tokens for piece in pieces)
    table: list[int | None] = [None] * -(-total // page_size)
    for piece in pieces:
        at = piece.offset // page_size
        table[at : at + piece.num_shared] = piece.file.pages[: piece.num_shared]
    fresh = iter(new_pages)
    return [next(fresh) if page is None else page for page in table]


def _copied_slots(
    pieces: list[Piece], page_size: int, table: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """The flat slots of the tokens not in shared pages: where they are, where they go in
    the new file, and how far each moves."""
    src: list[int] = []
    dst: list[int] = []
    shifts: list[int] = []
    for piece in pieces:
        pages = piece.file.pages
        for i in range(piece.num_shared * page_size, piece.file.num_tokens):
            j = piece.offset + i
            src.append(pages[i // page_size] * page_size + i % page_size)
            dst.append(table[j // page_size] * page_size + j % page_size)
            shifts.append(piece.shift)
    return src, dst, shifts
