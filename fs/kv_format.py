"""The bytes of a KV file: a versioned, self-describing header, token ids, then page data.

    magic "SYMKV\\0\\0\\1" | header length u32 | header (JSON: version, model fingerprint,
    dtype, page_size, num_layers, num_kv_heads, head_dim, num_tokens, num_pages)
    | token ids (int32 little-endian) | pages: for each page, for each layer, K then V
    ([page_size, num_kv_heads, head_dim] each, all slots)

Reading is an export: it gives these bytes. Writing them into an empty file imports
them (kv_import.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from symphony.engine.page_pool import PagePool

MAGIC = b"SYMKV\0\0\1"
VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Where each part of one file's bytes lies."""

    head: bytes  # magic, length, header JSON and token ids
    page_bytes: int
    num_pages: int

    @property
    def size(self) -> int:
        return len(self.head) + self.page_bytes * self.num_pages


def layout(pool: PagePool, fingerprint: str, token_ids: list[int], num_pages: int) -> Layout:
    k = pool.k_cache[0]
    header = {
        "version": VERSION,
        "model": fingerprint,
        "dtype": str(k.dtype).removeprefix("torch."),
        "page_size": pool.page_size,
        "num_layers": len(pool.k_cache),
        "num_kv_heads": k.shape[2],
        "head_dim": k.shape[3],
        "num_tokens": len(token_ids),
        "num_pages": num_pages,
    }
    body = json.dumps(header, sort_keys=True).encode()
    ids = np.asarray(token_ids, dtype="<i4").tobytes()
    return Layout(MAGIC + struct.pack("<I", len(body)) + body + ids, pool.bytes_per_page, num_pages)


def page_data(pool: PagePool, page: int) -> bytes:
    """One page's K and V for every layer, in file order."""
    parts = []
    for k, v in zip(pool.k_cache, pool.v_cache, strict=True):
        parts += [k[page].flatten(), v[page].flatten()]
    return torch.cat(parts).cpu().numpy().tobytes()


def read_range(
    pool: PagePool,
    lay: Layout,
    pages: list[int],
    offset: int,
    size: int,
    on_page: Callable[[int, bytes], None] | None = None,
) -> bytes:
    """Bytes [offset, offset + size) of a file with this layout and these pages;
    `on_page(page, data)` sees every page's bytes as they are read."""
    end = min(offset + size, lay.size)
    out = bytearray()
    pos = offset
    while pos < end:
        if pos < len(lay.head):
            take = lay.head[pos : min(end, len(lay.head))]
        else:
            index, within = divmod(pos - len(lay.head), lay.page_bytes)
            data = page_data(pool, pages[index])
            if on_page is not None:
                on_page(pages[index], data)
            take = data[within : within + (end - pos)]
        out += take
        pos += len(take)
    return bytes(out)
