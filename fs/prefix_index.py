"""The prefix index: full pages computed by the engine, found again by a chained hash.

A page's key is xxh3-64 over (parent page's key, its token ids, model fingerprint, cache
domain), so equal keys mean equal whole prefixes. Every hit is still checked against
the stored tokens and parent before it is trusted. The index holds one reference on
each page it lists; a page whose only reference is the index's is "cached" and is
evicted, least recently used first, when the pool runs short.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from symphony.engine.page_pool import PagePool

ROOT_HASH = 0


def page_hash(parent: int, token_ids: Sequence[int], fingerprint: str, domain: str) -> int:
    """The chained key of one full page."""
    h = xxhash.xxh3_64()
    h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(fingerprint.encode())
    h.update(b"\0")
    h.update(domain.encode())
    return h.intdigest()


@dataclass(frozen=True)
class IndexEntry:
    page: int
    parent: int
    token_ids: tuple[int, ...]


class PrefixIndex:
    """Hash -> page for full pages, with LRU eviction of pages only the index holds."""

    def __init__(self, pool: PagePool) -> None:
        self._pool = pool
        self._entries: OrderedDict[int, IndexEntry] = OrderedDict()
        self._hash_of_page: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: int, parent: int, token_ids: Sequence[int]) -> int | None:
        """The page stored under `key` if its parent and tokens match, else None."""
        entry = self._entries.get(key)
        if entry is None or entry.parent != parent or entry.token_ids != tuple(token_ids):
            return None
        self._entries.move_to_end(key)
        return entry.page

    def insert(self, key: int, parent: int, token_ids: Sequence[int], page: int) -> bool:
        """List `page` under `key` (taking a reference) unless either is listed already."""
        if key in self._entries or page in self._hash_of_page:
            return False
        self._pool.incref([page], quiet=True)  # the index's own: not sharing
        self._entries[key] = IndexEntry(page, parent, tuple(token_ids))
        self._hash_of_page[page] = key
        return True

    def is_indexed(self, page: int) -> bool:
        return page in self._hash_of_page

    def num_cached(self) -> int:
        """Listed pages nobody but the index references."""
        return sum(1 for e in self._entries.values() if self._pool.refcounts[e.page] == 1)

    def evict(self, num_pages: int, only: Callable[[int], bool] | None = None) -> int:
        """Free up to `num_pages` cached pages (those `only` accepts), least recently used
        first; return how many."""
        freed = 0
        for key in list(self._entries):
            if freed >= num_pages:
                break
            entry = self._entries[key]
            if self._pool.refcounts[entry.page] == 1 and (only is None or only(entry.page)):
                del self._entries[key]
                del self._hash_of_page[entry.page]
                self._pool.decref([entry.page], quiet=True)
                freed += 1
        return freed

    def clear(self) -> None:
        for entry in self._entries.values():
            self._pool.decref([entry.page], quiet=True)
        self._entries.clear()
        self._hash_of_page.clear()

    def check_invariants(self) -> None:
        if len(self._hash_of_page) != len(self._entries):
            raise AssertionError("index maps disagree")
        for key, entry in self._entries.items():
            if self._hash_of_page.get(entry.page) != key:
                raise AssertionError(f"page {entry.page} listed under two keys")
            if self._pool.refcounts[entry.page] < 1:
                raise AssertionError(f"indexed page {entry.page} is free")
