"""The page pool: preallocated K/V tensors per layer, handed out as refcounted pages."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
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
        self.reserved: set[int] = set()  # pages the engine keeps for itself (`reserve`)
        self.generation = [0] * num_pages  # how many times each page was handed out
        self.bytes_per_page = 2 * num_layers * self.k_cache[0][0].numel() * dtype.itemsize
        # pop() from the end hands out low page numbers first
        self._free = list(range(num_pages - 1, -1, -1))
        # pages whose refcount changed while in use, kept only once someone asks
        # (`track_changes`): who shares a page is what `du` of a KV file shows
        self.changed: set[int] | None = None
        # told the pages each decref freed (the store's accounting of who holds what)
        self.on_free: Callable[[list[int]], None] | None = None
        # on the CPU, every layer's K and V as bytes, one row a page: a page's bytes
        # are read and written without a tensor op per layer
        self._rows: list[np.ndarray] | None = None
        if self.k_cache[0].device.type == "cpu":
            self._rows = [
                t.view(torch.uint8).reshape(num_pages, -1).numpy() for t in self._tensors()
            ]
        # on a GPU, reads (a FUSE `read` of a KV file) copy on a stream of their own,
        # after the event of the last work that wrote the page: never behind a step
        # that runs now, unless that step writes the page
        self._side: torch.cuda.Stream | None = None
        self._written: dict[int, torch.cuda.Event] = {}
        if self.k_cache[0].device.type == "cuda":
            self._side = torch.cuda.Stream(self.k_cache[0].device)

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
            self.generation[page] += 1
        # zeroed: a slot no token fills yet is read (masked) by batched attention, and a
        # value left there by the page's last user (a NaN) would poison that softmax
        if pages:
            index = torch.tensor(pages, dtype=torch.long, device=self.k_cache[0].device)
            for cache in (*self.k_cache, *self.v_cache):
                cache.index_fill_(0, index, 0.0)
            self.mark_written(pages)
        return pages

    def reserve(self) -> int:
        """A page held by the engine itself for good (the CUDA graphs' padding rows
        write there), counted as one reference by the store's invariants."""
        (page,) = self.allocate(1)
        self.reserved.add(page)
        return page

    def mark_written(self, pages: Iterable[int]) -> None:
        """Note that the work queued so far writes `pages` (a step, a copy, a fill): a
        read of one waits for it. Nothing to do off a GPU, where writes are done when
        their call returns: `pages` is not even iterated there, so a caller passes a
        generator and pays nothing on a CPU."""
        if self._side is None:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.k_cache[0].device))
        for page in pages:
            self._written[page] = event

    def incref(self, pages: Iterable[int], quiet: bool = False) -> None:
        """One more reference to each page; `quiet` keeps it out of `changed` (a
        reference that does not change who shares the page)."""
        track = self.changed is not None and not quiet
        for page in pages:
            if self.refcounts[page] <= 0:
                raise ValueError(f"incref of free page {page}")
            self.refcounts[page] += 1
            if track:
                self.changed.add(page)  # type: ignore[union-attr]

    def decref(self, pages: Iterable[int], quiet: bool = False) -> list[int]:
        """Drop one reference to each page; return the pages that became free."""
        track = self.changed is not None and not quiet
        freed = []
        for page in pages:
            count = self.refcounts[page]
            if count <= 0:
                raise ValueError(f"decref of free page {page}")
            self.refcounts[page] = count - 1
            if track:
                self.changed.add(page)  # type: ignore[union-attr]
            if count == 1:
                self._free.append(page)
                freed.append(page)
        if freed and self.on_free is not None:
            self.on_free(freed)
        return freed

    def _tensors(self) -> list[torch.Tensor]:
        """K and V of every layer, in file order: K0, V0, K1, V1, ..."""
        return [t for pair in zip(self.k_cache, self.v_cache, strict=True) for t in pair]

    def _page_rows(self, page: int) -> list[np.ndarray]:
        """The page's bytes as one row per tensor of `_tensors` (on the CPU, views)."""
        if self._rows is not None:
            return [row[page] for row in self._rows]

        def stacked() -> torch.Tensor:
            return torch.stack([t[page].reshape(-1).view(torch.uint8) for t in self._tensors()])

        if self._side is None:  # another device: a plain copy
            return list(stacked().cpu().numpy())
        with torch.cuda.stream(self._side):
            written = self._written.get(page)
            if written is not None:
                self._side.wait_event(written)
            host = stacked().to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._side)
        done.synchronize()  # this copy and the writes it follows, nothing queued since
        return list(host.numpy())

    def page_bytes(self, page: int, filled: int | None = None) -> bytes:
        """The page's K then V of layer 0, K then V of layer 1, ..., every slot; with
        `filled`, the slots past the first `filled` read as zeros (a page is not cleared
        when handed out: what a previous owner left there must never be read back)."""
        rows = self._page_rows(page)
        if filled is None or filled >= self.page_size:
            return b"".join(row.data for row in rows)
        keep = filled * (len(rows[0]) // self.page_size)
        blank = bytes(len(rows[0]) - keep)
        return b"".join(part for row in rows for part in (row[:keep].data, blank))

    def write_page_bytes(self, page: int, data: bytes) -> None:
        """Fill `page` from bytes in the order `page_bytes` gives them."""
        if len(data) != self.bytes_per_page:
            raise ValueError(f"a page is {self.bytes_per_page} bytes, not {len(data)}")
        parts = np.frombuffer(data, dtype=np.uint8).reshape(2 * len(self.k_cache), -1)
        if self._rows is not None:
            for row, part in zip(self._rows, parts, strict=True):
                row[page] = part
            return
        for t, part in zip(self._tensors(), parts, strict=True):
            t[page].view(-1).view(torch.uint8).copy_(torch.from_numpy(part.copy()))
        self.mark_written([page])

    def copy_page(self, src: int, dst: int, num_tokens: int | None = None) -> None:
        """Copy the K/V of the first `num_tokens` slots (all by default) of `src` into `dst`."""
        n = self.page_size if num_tokens is None else num_tokens
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst, :n].copy_(cache[src, :n])
        self.mark_written([dst])

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of flat slots `src` (page * page_size + offset) into `dst`, in
        every layer. The two lists must not overlap."""
        if not src:
            return
        device = self.k_cache[0].device
        a = torch.tensor(src, dtype=torch.long, device=device)
        b = torch.tensor(dst, dtype=torch.long, device=device)
        for cache in (*self.k_cache, *self.v_cache):
            flat = cache.view(-1, *cache.shape[2:])
            flat.index_copy_(0, b, flat.index_select(0, a))
        self.mark_written(slot // self.page_size for slot in dst)

    def max_abs_diff(self, pages_a: list[int], pages_b: list[int], num_tokens: int) -> float:
        """The largest |a - b| over the K/V of the first `num_tokens` slots of two page
        lists holding the same tokens (the slots past them are not compared)."""
        return self.deviation(pages_a, pages_b, num_tokens)[0]

    def deviation(
        self, pages_a: list[int], pages_b: list[int], num_tokens: int, rtol: float = 0.0
    ) -> tuple[float, float]:
        """(the largest |a - b|, the largest |a - b| - rtol |b|) over the K/V of the first
        `num_tokens` slots of two page lists holding the same tokens, in one pass."""
        worst = beyond = 0.0
        if not num_tokens:
            return worst, beyond
        a = torch.tensor(pages_a, dtype=torch.long, device=self.k_cache[0].device)
        b = torch.tensor(pages_b, dtype=torch.long, device=self.k_cache[0].device)
        for cache in (*self.k_cache, *self.v_cache):
            # [num_pages, page_size, heads, head_dim] -> [tokens, heads * head_dim]
            x = cache.index_select(0, a).flatten(0, 1)[:num_tokens].float()
            y = cache.index_select(0, b).flatten(0, 1)[:num_tokens].float()
            diff = (x - y).abs()
            worst = max(worst, diff.max().item())
            beyond = max(beyond, (diff - rtol * y.abs()).max().item())
        return worst, beyond

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
