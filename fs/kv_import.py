"""Importing a KV file from its bytes, written in order from offset 0 (`cp` into the mount).

Every part is checked as it arrives: magic, version (1 or 2), model fingerprint, dtype,
page size, geometry, token count, ids and positions (version 1 has none: token i is at
position i), lengths. A page whose bytes equal a page the store already holds (found by
xxh3 of the bytes, then compared byte for byte) is shared, not copied: `cp a.kv b.kv`
inside the mount makes b share every page of a. Anything wrong is EINVAL and gives back
every page taken so far.
"""

from __future__ import annotations

import errno
import json
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import xxhash

from symphony.engine.page_pool import PagePool
from symphony.fs import kv_format
from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.grammar import MAX_SPEC_BYTES

# the fields, and a grammar's record: its source, escaped in JSON (6 bytes a byte at most)
MAX_HEADER = 4096 + 6 * MAX_SPEC_BYTES
# The largest K/V magnitude an import may hold: the largest half-precision value. Real
# K/V stay far below it; past it a crafted page could overflow the engine's sums.
MAX_KV_VALUE = 65504.0
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def einval(message: str) -> StoreError:
    return StoreError(errno.EINVAL, f"not a KV file of this server: {message}")


class ContentIndex:
    """(domain, xxh3 of a page's bytes) -> pages holding those bytes, filled as pages are
    read and imported.

    An entry is a hint: it holds the page's generation (freed and handed out again, the
    page is someone else's) and how many of its slots the bytes covered, and every hit is
    compared byte for byte before it is trusted, so a page written since it was hashed
    is never shared by mistake. Entries are per domain (uid): a page is shared with an
    import only if that user read it (so could read it) or imported it; otherwise `du`
    of an import would tell whether someone else holds the same bytes.
    """

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self._pages: dict[tuple[str, int], set[tuple[int, int, int]]] = {}
        self._size = 0

    def note(self, page: int, filled: int, digest: int, domain: str) -> None:
        """`page`, with its first `filled` slots (the rest zeros), hashes to `digest`."""
        entries = self._pages.setdefault((domain, digest), set())
        before = len(entries)
        entries.add((page, self.pool.generation[page], filled))
        self._size += len(entries) - before
        if self._size > 4 * self.pool.num_pages:
            self._forget_stale()

    def _forget_stale(self) -> None:
        for key, entries in list(self._pages.items()):
            entries -= {e for e in entries if not self._live(e[0], e[1])}
            if not entries:
                del self._pages[key]
        self._size = sum(len(e) for e in self._pages.values())

    def find(self, data: bytes, digest: int, domain: str) -> int | None:
        """A page of `domain`'s holding exactly `data`, or None."""
        for page, generation, filled in list(self._pages.get((domain, digest), ())):
            if self._live(page, generation) and self.pool.page_bytes(page, filled) == data:
                return page
        return None

    def _live(self, page: int, generation: int) -> bool:
        """Whether `page` is in use and has not been freed since its `generation`."""
        return bool(self.pool.refcounts[page]) and self.pool.generation[page] == generation


def digest_of(data: bytes) -> int:
    """The content key of a page's bytes."""
    return xxhash.xxh3_64_intdigest(data)


class Importer:
    """One import in progress: feed it the bytes in order, then commit or abort it."""

    def __init__(
        self,
        pool: PagePool,
        fingerprint: str,
        content: ContentIndex,
        max_tokens: int,
        vocab_size: int,
        domain: str,
        holder: Holder,
        allocate: Callable[[int], list[int]],
    ) -> None:
        self.pool = pool
        self.holder = holder  # whom its pages are charged to (`allocate` charges them)
        self.uid = holder.uid  # who imports: the file's origin
        self._allocate = allocate
        self.fingerprint = fingerprint
        self.content = content
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.domain = domain  # pages are shared only with those its owner's reads noted
        self.received = 0
        self._pieces: deque[memoryview] = deque()  # received, not yet consumed
        self._pending = 0  # their length
        self.size: int | None = None  # the whole file's, once its header is read
        self.header: dict[str, Any] | None = None
        self.token_ids: list[int] | None = None
        self.positions_read = False  # a version-1 file has none to read: done at its ids
        # once the positions are read (for the file the import is committed into): each
        # token's position, None when they are the default 0..n-1 (and for version 1);
        # the first token whose position is not its index, None if there is none
        self.positions: list[int] | None = None
        self.custom_from: int | None = None
        self.pages: list[int] = []  # references this import holds
        self.ended = False  # committed or aborted: it takes no page any more
        self.error: StoreError | None = None  # what ended it: every later write says so

    def write(self, offset: int, data: bytes) -> None:
        """Take the next bytes.

        Raises:
            StoreError: EINVAL for a write out of order or bytes that do not fit.
        """
        if self.error is not None:
            raise StoreError(self.error.errno, f"an earlier write failed: {self.error.args[0]}")
        if offset < self.received:
            raise StoreError(
                errno.EINVAL,
                f"KV files are written in order: offset {offset}, expected {self.received}",
            )
        if offset > self.received and self.size is None:
            raise einval("a hole before the header ends")
        if self.size is not None and offset + len(data) > self.size:
            raise einval(f"bytes past the end of its {self.size} bytes")
        if offset > self.received:  # a hole (cp skips runs of zeros): it reads as zeros
            self._pieces.append(memoryview(bytes(offset - self.received)))
            self._pending += offset - self.received
        self._pieces.append(memoryview(data))
        self._pending += len(data)
        self.received = offset + len(data)
        try:
            self._consume()
        except BaseException as exc:  # a refusal, or a bug: either way no page is kept
            self.abort()
            self.error = exc if isinstance(exc, StoreError) else einval("a bug: see the log")
            raise

    def _take(self, n: int) -> list[memoryview]:
        """The next `n` bytes received, as pieces of what was written (not copied)."""
        taken: list[memoryview] = []
        while n:
            piece = self._pieces.popleft()
            if len(piece) > n:
                piece, rest = piece[:n], piece[n:]
                self._pieces.appendleft(rest)
            taken.append(piece)
            n -= len(piece)
        self._pending -= sum(len(p) for p in taken)
        return taken

    def _peek(self, n: int) -> bytes:
        taken = self._take(n)
        self._pieces.extendleft(reversed(taken))
        self._pending += n
        return b"".join(taken)

    def _consume(self) -> None:
        if self.header is None:
            if self._pending < 12:
                return
            head = self._peek(12)
            if head[:8] != kv_format.MAGIC:
                raise einval("bad magic or version")
            (length,) = struct.unpack("<I", head[8:12])
            if length > MAX_HEADER:
                raise einval("header too long")
            if self._pending < 12 + length:
                return
            self.header = self._check_header(b"".join(self._take(12 + length))[12:])
            n, pages = self.header["num_tokens"], self.header["num_pages"]
            version = self.header["version"]
            self.size = kv_format.file_size(length, n, pages, self.pool.bytes_per_page, version)
            if self.received > self.size:
                raise einval(f"bytes past the end of its {self.size} bytes")
        if self.token_ids is None:
            need = 4 * self.header["num_tokens"]
            if self._pending < need:
                return
            ids = np.frombuffer(b"".join(self._take(need)), dtype="<i4").tolist()
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise einval(f"a token id outside 0..{self.vocab_size - 1}")
            self.token_ids = ids
            self.positions_read = self.header["version"] == 1
        if not self.positions_read:
            need = 4 * self.header["num_tokens"]
            if self._pending < need:
                return
            self._set_positions(np.frombuffer(b"".join(self._take(need)), dtype="<i4").tolist())
        page_bytes = self.pool.bytes_per_page
        while self._pending >= page_bytes:
            if len(self.pages) == self.header["num_pages"]:
                raise einval("more bytes than its pages")
            self._take_page(self._take(page_bytes))

    def _check_header(self, raw: bytes) -> dict[str, Any]:
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError):
            raise einval("header is not JSON") from None
        if not isinstance(header, dict):
            raise einval("header is not a map")
        version = header.get("version")
        if type(version) is not int or version not in kv_format.READ_VERSIONS:
            versions = " and ".join(map(str, kv_format.READ_VERSIONS))
            raise einval(f"version {version!r}; this server reads versions {versions}")
        for key, value in kv_format.geometry(self.pool, self.fingerprint).items():
            if header.get(key) != value:
                raise einval(f"{key} is {header.get(key)!r}, this server has {value!r}")
        n, pages = header.get("num_tokens"), header.get("num_pages")
        if not (isinstance(n, int) and isinstance(pages, int)) or n < 0 or n > self.max_tokens:
            raise einval("bad token count")
        if pages != -(-n // self.pool.page_size):
            raise einval(f"{pages} pages cannot hold exactly {n} tokens")
        return header

    def _set_positions(self, positions: list[int]) -> None:
        """Check the positions read (each a position this server's context holds) and
        keep them, None when each token is at its index."""
        if any(not isinstance(p, int) or not 0 <= p < self.max_tokens for p in positions):
            raise einval(f"a position outside 0..{self.max_tokens - 1}")
        self.custom_from = next((i for i, p in enumerate(positions) if p != i), None)
        self.positions = None if self.custom_from is None else positions
        self.positions_read = True

    def _take_page(self, pieces: list[memoryview]) -> None:
        data = b"".join(pieces)
        self._check_values(data)
        digest = digest_of(data)
        page = self.content.find(data, digest, self.domain)
        if page is not None:
            self.pool.incref([page])
            self.pages.append(page)
        else:
            (page,) = self._allocate(1)
            self.pages.append(page)  # held (and given back by abort) before it is filled
            self.pool.write_page_bytes(page, data)
            assert self.header is not None
            ps, index = self.pool.page_size, len(self.pages) - 1
            filled = kv_format.slots_filled(self.header["num_tokens"], ps, index)
            self.content.note(page, filled, digest, self.domain)

    def _check_values(self, data: bytes) -> None:
        """Refuse a page holding a NaN, an infinity or a value past MAX_KV_VALUE."""
        dtype = self.pool.k_cache[0].dtype
        if dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are a float32's top half
            values = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype])
        # a NaN makes the max NaN, which compares False: one pass finds all three
        if values.size and not np.abs(values).max() <= MAX_KV_VALUE:
            raise einval(
                f"page {len(self.pages)} holds a value that is not finite or past {MAX_KV_VALUE:g}"
            )

    def extend_to(self, size: int) -> None:
        """ftruncate past the end of what was written: the rest is a hole of zeros."""
        if size > self.received:
            self.write(size, b"")

    def complete(self) -> bool:
        return self.error is None and (
            self.header is not None
            and self.token_ids is not None
            and self.positions_read
            and not self._pending
            and len(self.pages) == self.header["num_pages"]
        )

    def abort(self) -> None:
        self.pool.decref(self.pages)
        self.pages = []
        self.ended = True
