"""The bytes of a KV file: a versioned, self-describing header, token ids and their
positions, then page data.

    magic "SYMKV\\0\\0\\1" | header length u32 | header (JSON: version, model fingerprint,
    dtype, page_size, num_layers, num_kv_heads, head_dim, num_tokens, num_pages, and
    for a constrained file its grammar: {"kind", "source", "start"})
    | token ids (int32 little-endian) | positions (int32 little-endian, one per token:
    the RoPE position its K were computed at) | pages: for each page, for each layer, K
    then V ([page_size, num_kv_heads, head_dim] each, all slots)

Version 2 is written; version 1 (no positions: token i at position i) is still read.
The header's length does not depend on the positions, so a file's size depends only on
its token and page counts (and its grammar's record). Reading is an export: it gives
these bytes. Writing them into an empty file imports them (kv_import.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from symphony.engine.page_pool import PagePool

MAGIC = b"SYMKV\0\0\1"
VERSION = 2  # the version written
READ_VERSIONS = (1, 2)  # the versions an import accepts


@dataclass(frozen=True)
class Layout:
    """Where each part of one file's bytes lies."""

    head: bytes  # magic, length, header JSON, token ids and positions
    page_bytes: int
    num_pages: int
    num_tokens: int
    page_size: int

    @property
    def size(self) -> int:
        return len(self.head) + self.page_bytes * self.num_pages


def geometry(pool: PagePool, fingerprint: str) -> dict[str, object]:
    """The header fields a file must share with this server to be imported here (the
    model and the page layout; the version is checked apart: several are read)."""
    k = pool.k_cache[0]
    return {
        "model": fingerprint,
        "dtype": str(k.dtype).removeprefix("torch."),
        "page_size": pool.page_size,
        "num_layers": len(pool.k_cache),
        "num_kv_heads": k.shape[2],
        "head_dim": k.shape[3],
    }


def _header(
    pool: PagePool,
    fingerprint: str,
    num_tokens: int,
    num_pages: int,
    grammar: dict[str, Any] | None = None,
) -> bytes:
    fields: dict[str, Any] = {
        "version": VERSION,
        **geometry(pool, fingerprint),
        "num_tokens": num_tokens,
        "num_pages": num_pages,
    }
    if grammar is not None:  # a constrained file's grammar (Grammar.record)
        fields["grammar"] = grammar
    return json.dumps(fields, sort_keys=True).encode()


def record_length(grammar: dict[str, Any]) -> int:
    """How long a grammar's record is in a header (as `_header` writes it)."""
    return len(json.dumps(grammar, sort_keys=True))


def file_size(
    header_len: int, num_tokens: int, num_pages: int, page_bytes: int, version: int = VERSION
) -> int:
    """Magic, length, header, int32 ids (and, from version 2, int32 positions), pages."""
    per_token = 4 if version == 1 else 8
    return len(MAGIC) + 4 + header_len + per_token * num_tokens + num_pages * page_bytes


def size(
    pool: PagePool,
    fingerprint: str,
    num_tokens: int,
    num_pages: int,
    grammar_len: int | None = None,
) -> int:
    """The byte length of a file of `num_tokens` tokens over `num_pages` pages, as
    exported (the current version); `grammar_len` is its grammar's record's length as
    header JSON (`record_length`), if it has one."""
    header_len = len(_header(pool, fingerprint, num_tokens, num_pages))
    if grammar_len is not None:  # the header holds `"grammar": RECORD, ` more
        header_len += len('"grammar": , ') + grammar_len
    return file_size(header_len, num_tokens, num_pages, pool.bytes_per_page)


def layout(
    pool: PagePool,
    fingerprint: str,
    token_ids: Sequence[int],
    num_pages: int,
    positions: Sequence[int] | None = None,
    grammar: dict[str, Any] | None = None,
) -> Layout:
    """The layout of a file's export; `positions` are its tokens' (`KVFile.position_list`;
    None: token i at position i), `grammar` its grammar's record."""
    num_tokens = len(token_ids)
    if positions is None:
        positions = range(num_tokens)
    if len(positions) != num_tokens:
        raise ValueError(f"{len(positions)} positions for {num_tokens} tokens")
    body = _header(pool, fingerprint, num_tokens, num_pages, grammar)
    ids = np.asarray(token_ids, dtype="<i4").tobytes()
    where = np.asarray(positions, dtype="<i4").tobytes()
    head = MAGIC + struct.pack("<I", len(body)) + body + ids + where
    return Layout(head, pool.bytes_per_page, num_pages, num_tokens, pool.page_size)


def slots_filled(num_tokens: int, page_size: int, index: int) -> int:
    """How many slots of a file's `index`-th page hold its tokens (the rest read as 0)."""
    return min(page_size, num_tokens - index * page_size)


def read_range(lay: Layout, offset: int, size: int, page_at: Callable[[int], bytes]) -> bytes:
    """Bytes [offset, offset + size) of a file with this layout; `page_at(i)` gives the
    bytes of its i-th page (`PagePool.page_bytes`)."""
    end = min(offset + size, lay.size)
    parts = []
    pos = offset
    while pos < end:
        if pos < len(lay.head):
            take = lay.head[pos : min(end, len(lay.head))]
        else:
            index, within = divmod(pos - len(lay.head), lay.page_bytes)
            take = page_at(index)[within : within + (end - pos)]
        parts.append(take)
        pos += len(take)
    return parts[0] if len(parts) == 1 else b"".join(parts)
