"""The store's invariants, checked by tests after every scenario and by /.sys/status:
every page's refcount is the references files, appends, imports, readers and the index
hold, the page charges name only pages in use, and each grammar was fed its file's
tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from symphony.fs.store import KVStore


def check_store(store: KVStore) -> None:  # the store's own: it reads its private parts
    """Raise AssertionError unless refcounts, files, index, pool and charges agree."""
    store.pool.check_invariants()
    expected = [0] * store.pool.num_pages
    files = {f.inode: f for f in store.ns.files()} | store._orphans
    for file in files.values():
        n = file.num_tokens
        if len(file.pages) != -(-n // store.page_size):
            raise AssertionError(f"file {file.inode}: {len(file.pages)} pages for {n} tokens")
        if len(file.page_hashes) != n // store.page_size:
            raise AssertionError(f"file {file.inode}: wrong number of page hashes")
        if file.positions is not None and len(file.positions) != n:
            raise AssertionError(f"file {file.inode}: {len(file.positions)} positions")
        grammar = file.grammar
        if grammar is not None and not file.busy and grammar.fed != n - grammar.start:
            raise AssertionError(
                f"file {file.inode}: grammar fed {grammar.fed} of {n - grammar.start} tokens"
            )
        for page in file.pages:
            expected[page] += 1
    for plan in store._plans:
        for page in plan.owned:
            expected[page] += 1
    for imported in store._importers:
        for page in imported.pages:
            expected[page] += 1
    for page, count in store._held.items():
        expected[page] += count
    for page in store.pool.reserved:
        expected[page] += 1
    if store.index is not None:
        store.index.check_invariants()
        for page in range(store.pool.num_pages):
            expected[page] += int(store.index.is_indexed(page))
    for page, (want, got) in enumerate(zip(expected, store.pool.refcounts, strict=True)):
        if want != got:
            raise AssertionError(f"page {page}: refcount {got}, references {want}")
    store.charges.check_invariants(store.pool.refcounts)
