"""The page pool: preallocated K/V tensors per layer, handed out as refcounted pages."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from symphony.engine.errors import OutOfPagesError


class PagePool:
    """Fixed-size pages of K and V for every layer, with refcounts and a free list.

    The pool only counts references; the KV store decides which file owns which page.
    A page is free exactly when its refcount is zero.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # one tensor per layer for K and one for V: [num_pages, page_size, num_kv_heads, head_dim]
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.refcounts = [0] * num_pages
        # pop() from the end hands out low page numbers first
        self._free = list(range(num_pages - 1, -1, -1))
        # pages whose refcount changed while in use, kept only once someone asks
        # (`track_changes`): who shares a page is what `du` of a KV file shows
        self.changed: set[int] | None = None

    def track_changes(self) -> None:
        if self.changed is None:
            self.changed = set()

    def take_changed(self) -> set[int]:
        """The pages whose refcount changed since the last call (tracking must be on)."""
        assert self.changed is not None
        changed, self.changed = self.changed, set()
        return changed

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def bytes_per_page(self) -> int:
        k = self.k_cache[0]
        return 2 * len(self.k_cache) * k[0].numel() * k.element_size()

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages, each with refcount 1.

        Raises:
            OutOfPagesError: fewer than `n` pages are free; nothing is taken.
        """
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self.refcounts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for page in pages:
            if self.refcounts[page] <= 0:
                raise ValueError(f"incref of free page {page}")
            self.refcounts[page] += 1
            if self.changed is not None:
                self.changed.add(page)

    def decref(self, pages: Iterable[int]) -> list[int]:
        """Drop one reference to each page; return the pages that became free."""
        freed = []
        for page in pages:
            count = self.refcounts[page]
            if count <= 0:
                raise ValueError(f"decref of free page {page}")
            self.refcounts[page] = count - 1
            if self.changed is not None:
                self.changed.add(page)
            if count == 1:
                self._free.append(page)
                freed.append(page)
        return freed

    def copy_page(self, src: int, dst: int, num_tokens: int | None = None) -> None:
        """Copy the K/V of the first `num_tokens` slots (all by default) of `src` into `dst`."""
        n = self.page_size if num_tokens is None else num_tokens
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst, :n].copy_(cache[src, :n])

    def check_invariants(self) -> None:
        """Raise AssertionError if free list and refcounts disagree."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for page, count in enumerate(self.refcounts):
            if count < 0:
                raise AssertionError(f"page {page} has refcount {count}")
            if (count == 0) != (page in free):
                raise AssertionError(f"page {page}: refcount {count}, on free list {page in free}")
