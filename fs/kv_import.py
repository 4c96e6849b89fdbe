"""Importing a KV file from its bytes, written in order from offset 0 (`cp` into the mount).

Every part is checked as it arrives: magic, version, model fingerprint, dtype, page size,
geometry, token count and ids, lengths. A page whose bytes equal a page the store
already holds (found by xxh3 of the bytes, then compared byte for byte) is shared, not
copied: `cp a.kv b.kv` inside the mount makes b share every page of a. Anything wrong is
EINVAL and gives back every page taken so far.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import xxhash

from symphony.engine.page_pool import PagePool
from symphony.fs import kv_format
from symphony.fs.errors import StoreError

MAX_HEADER = 4096


def einval(message: str) -> StoreError:
    return StoreError(errno.EINVAL, f"not a KV file of this server: {message}")


class ContentIndex:
    """xxh3 of a page's bytes -> pages holding those bytes, filled as pages are read.

    An entry is a hint: every hit is compared byte for byte before it is trusted, so a
    page written since it was hashed is never shared by mistake.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._pages: dict[int, set[int]] = {}

    def note(self, page: int, data: bytes) -> None:
        self._pages.setdefault(xxhash.xxh3_64_intdigest(data), set()).add(page)

    def find(self, data: bytes) -> int | None:
        for page in list(self._pages.get(xxhash.xxh3_64_intdigest(data), ())):
            if self.pool.refcounts[page] > 0 and kv_format.page_data(self.pool, page) == data:
                return page
        return None


class Importer:
    """One import in progress: feed it the bytes in order, then commit or abort it."""

    def __init__(
        self,
        pool: PagePool,
        fingerprint: str,
        content: ContentIndex,
        max_tokens: int,
        allocate: Callable[[int], list[int]],
    ) -> None:
        self.pool = pool
        self._allocate = allocate
        self.fingerprint = fingerprint
        self.content = content
        self.max_tokens = max_tokens
        self.received = 0
        self._buf = bytearray()
        self.header: dict[str, Any] | None = None
        self.token_ids: list[int] | None = None
        self.pages: list[int] = []  # references this import holds
        self.failed = False

    def write(self, offset: int, data: bytes) -> None:
        """Take the next bytes.

        Raises:
            StoreError: EINVAL for a write out of order or bytes that do not fit.
        """
        if self.failed:
            raise einval("an earlier write of this import failed")
        if offset < self.received:
            raise StoreError(
                errno.EINVAL,
                f"KV files are written in order: offset {offset}, expected {self.received}",
            )
        if offset > self.received:  # a hole (cp skips runs of zeros): it reads as zeros
            data = bytes(offset - self.received) + data
        self.received += len(data)
        self._buf += data
        try:
            self._consume()
        except StoreError:
            self.abort()
            self.failed = True
            raise

    def _consume(self) -> None:
        if self.header is None:
            if len(self._buf) < 12:
                return
            if bytes(self._buf[:8]) != kv_format.MAGIC:
                raise einval("bad magic or version")
            (length,) = struct.unpack("<I", self._buf[8:12])
            if length > MAX_HEADER:
                raise einval("header too long")
            if len(self._buf) < 12 + length:
                return
            self.header = self._check_header(bytes(self._buf[12 : 12 + length]))
            del self._buf[: 12 + length]
        if self.token_ids is None:
            need = 4 * self.header["num_tokens"]
            if len(self._buf) < need:
                return
            ids = np.frombuffer(bytes(self._buf[:need]), dtype="<i4").tolist()
            if any(t < 0 for t in ids):
                raise einval("negative token id")
            self.token_ids = ids
            del self._buf[:need]
        page_bytes = self.pool.bytes_per_page
        while len(self._buf) >= page_bytes:
            if len(self.pages) == self.header["num_pages"]:
                raise einval("more bytes than its pages")
            self._take_page(bytes(self._buf[:page_bytes]))
            del self._buf[:page_bytes]

    def _check_header(self, raw: bytes) -> dict[str, Any]:
        try:
            header = json.loads(raw)
        except ValueError:
            raise einval("header is not JSON") from None
        k = self.pool.k_cache[0]
        want = {
            "version": kv_format.VERSION,
            "model": self.fingerprint,
            "dtype": str(k.dtype).removeprefix("torch."),
            "page_size": self.pool.page_size,
            "num_layers": len(self.pool.k_cache),
            "num_kv_heads": k.shape[2],
            "head_dim": k.shape[3],
        }
        if not isinstance(header, dict):
            raise einval("header is not a map")
        for key, value in want.items():
            if header.get(key) != value:
                raise einval(f"{key} is {header.get(key)!r}, this server has {value!r}")
        n, pages = header.get("num_tokens"), header.get("num_pages")
        if not (isinstance(n, int) and isinstance(pages, int)) or n < 0 or n > self.max_tokens:
            raise einval("bad token count")
        if pages != -(-n // self.pool.page_size):
            raise einval(f"{pages} pages cannot hold exactly {n} tokens")
        return header

    def _take_page(self, data: bytes) -> None:
        page = self.content.find(data)
        if page is not None:
            self.pool.incref([page])
        else:
            (page,) = self._allocate(1)
            flat = torch.frombuffer(bytearray(data), dtype=self.pool.k_cache[0].dtype)
            per = self.pool.k_cache[0][0].numel()
            for i, (k, v) in enumerate(zip(self.pool.k_cache, self.pool.v_cache, strict=True)):
                k[page].copy_(flat[2 * i * per : (2 * i + 1) * per].view_as(k[page]))
                v[page].copy_(flat[(2 * i + 1) * per : (2 * i + 2) * per].view_as(v[page]))
            self.content.note(page, data)
        self.pages.append(page)

    def extend_to(self, size: int) -> None:
        """ftruncate past the end of what was written: the rest is a hole of zeros."""
        if size > self.received:
            self.write(size, b"")

    def complete(self) -> bool:
        return not self.failed and (
            self.header is not None
            and self.token_ids is not None
            and not self._buf
            and len(self.pages) == self.header["num_pages"]
        )

    def abort(self) -> None:
        self.pool.decref(self.pages)
        self.pages = []
