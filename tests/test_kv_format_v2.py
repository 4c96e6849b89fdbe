"""Version 2 of the KV byte format carries each token's position; version 1 is still read."""

from __future__ import annotations

import json
import os
import struct

import pytest
import trio

from symphony.engine.engine import Engine
from symphony.fs import kv_format
from symphony.fs.errors import StoreError
from symphony.fs.fuse_cache import KernelCache
from symphony.fs.fuse_ops import KVFileSystem
from symphony.fs.fuse_sys import SysTree
from symphony.fs.nodes import ROOT, KVFile
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine
from tests.test_kv_import import export
from tests.test_posix import CTX
from tests.test_store import append

PS = 4
IDS = list(range(5, 23))  # 18 tokens over 5 pages
# as after dropping 3 tokens at 6..8 without re-rotating the tail: 6.. sit at 9..
POSITIONS = list(range(6)) + list(range(9, 21))


@pytest.fixture
def engine() -> Engine:
    return make_tiny_engine(num_pages=32, page_size=PS)


@pytest.fixture
def store(engine) -> KVStore:
    """A store holding a.kv (IDS at POSITIONS, custom from token 6) and plain.kv (IDS)."""
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    store.ns.chmod("", ROOT, 0o1777)
    custom = store.ns.create_file("a.kv", ROOT, 0o600, "")
    append(engine, store, custom, IDS)
    custom.positions, custom.custom_from = list(POSITIONS), 6  # as kv_drop would leave it
    append(engine, store, store.ns.create_file("plain.kv", ROOT, 0o600, ""), IDS)
    return store


def header_of(data: bytes) -> tuple[dict[str, object], int]:
    """The header of a file's bytes and where its token ids begin."""
    (length,) = struct.unpack("<I", data[8:12])
    return json.loads(data[12 : 12 + length]), 12 + length


def with_header(data: bytes, **fields: object) -> bytes:
    """`data` with header fields changed (its length and what follows kept)."""
    header, ids_at = header_of(data)
    body = json.dumps({**header, **fields}, sort_keys=True).encode()
    return kv_format.MAGIC + struct.pack("<I", len(body)) + body + data[ids_at:]


def page_bytes(store: KVStore, file: KVFile) -> list[bytes]:
    n = file.num_tokens
    return [
        store.pool.page_bytes(p, kv_format.slots_filled(n, PS, i)) for i, p in enumerate(file.pages)
    ]


def import_bytes(store: KVStore, data: bytes, chunk: int = 1 << 20):  # type: ignore[no-untyped-def]
    importer = store.importer(ROOT)
    for off in range(0, len(data), chunk):
        importer.write(off, data[off : off + chunk])
    return importer


def refused(store: KVStore, data: bytes) -> str:
    """The EINVAL message importing `data` ends with; no page is kept."""
    importer = store.importer(ROOT)
    with pytest.raises(StoreError) as info:
        importer.write(0, data)
    assert info.value.errno_name == "EINVAL"
    assert not importer.pages
    store.check_invariants()
    return str(info.value)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_custom_positions_export_and_import_to_the_same_positions_and_kv(store, chunk):
    data = export(store, "a.kv")
    header, ids_at = header_of(data)
    assert header["version"] == 2
    n = len(IDS)
    assert struct.unpack(f"<{n}i", data[ids_at : ids_at + 4 * n]) == tuple(IDS)
    assert struct.unpack(f"<{n}i", data[ids_at + 4 * n : ids_at + 8 * n]) == tuple(POSITIONS)
    importer = import_bytes(store, data, chunk)
    assert importer.complete()
    assert (importer.positions, importer.custom_from) == (POSITIONS, 6)
    copy = store.ns.create_file("b.kv", ROOT, 0o600, "")
    store.commit_import(copy, importer)
    assert copy.token_ids == IDS
    assert page_bytes(store, copy) == page_bytes(store, store.ns.lookup_file("a.kv", ROOT))
    store.check_invariants()


def test_a_file_at_default_positions_imports_with_none(store):
    data = export(store, "plain.kv")
    _, ids_at = header_of(data)
    n = len(IDS)
    assert struct.unpack(f"<{n}i", data[ids_at + 4 * n : ids_at + 8 * n]) == tuple(range(n))
    importer = import_bytes(store, data)
    assert importer.complete()
    assert (importer.positions, importer.custom_from) == (None, None)  # plain stays plain
    importer.abort()
    store.check_invariants()


def test_a_version_1_file_imports_at_default_positions(store):
    """Version 1 had no positions: its ids are followed by its pages."""
    plain = store.ns.lookup_file("plain.kv", ROOT)
    fields = {
        **kv_format.geometry(store.pool, store.fingerprint),
        "version": 1,
        "num_tokens": len(IDS),
        "num_pages": len(plain.pages),
    }
    body = json.dumps(fields, sort_keys=True).encode()
    ids = struct.pack(f"<{len(IDS)}i", *IDS)
    data = kv_format.MAGIC + struct.pack("<I", len(body)) + body + ids
    data += b"".join(page_bytes(store, plain))
    importer = import_bytes(store, data, 5)
    assert importer.complete()
    assert (importer.positions, importer.custom_from) == (None, None)
    copy = store.ns.create_file("v1.kv", ROOT, 0o600, "")
    store.commit_import(copy, importer)
    assert copy.token_ids == IDS and page_bytes(store, copy) == page_bytes(store, plain)
    store.check_invariants()
    # a version-2 file relabelled version 1 is its positions too long: refused
    assert "past the end" in refused(store, with_header(export(store, "a.kv"), version=1))


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_another_version_is_einval_naming_the_versions_read(store, version):
    message = refused(store, with_header(export(store, "a.kv"), version=version))
    assert f"version {version!r}; this server reads versions 1 and 2" in message


@pytest.mark.parametrize("position", [-1, 64, 1 << 30])
def test_a_position_outside_the_context_is_einval(store, position):
    data = bytearray(export(store, "a.kv"))
    _, ids_at = header_of(bytes(data))
    at = ids_at + 4 * len(IDS) + 4 * 10  # the 11th token's position
    data[at : at + 4] = struct.pack("<i", position)
    assert "a position outside 0..63" in refused(store, bytes(data))


def test_st_size_on_the_mount_is_the_exported_byte_count(engine, store):
    ops = KVFileSystem(
        store, SysTree(store, engine.tokenizer, lambda n, c: "", None), KernelCache(store)
    )
    store.ns.create_file("empty.kv", ROOT, 0o600, "")
    read: dict[str, bytes] = {}

    async def scenario() -> None:
        for path in ("a.kv", "plain.kv", "empty.kv"):
            inode = store.ns.lookup_file(path, ROOT).inode
            info = await ops.open(inode, os.O_RDONLY, CTX)
            read[path] = await ops.read(info.fh, 0, 1 << 20)
            await ops.release(info.fh)
            assert (await ops.getattr(inode, CTX)).st_size == len(read[path])

    trio.run(scenario)
    n, custom = len(IDS), store.ns.lookup_file("a.kv", ROOT)
    data = read["a.kv"]
    assert data == export(store, "a.kv")
    _, ids_at = header_of(data)
    assert struct.unpack(f"<{n}i", data[ids_at + 4 * n : ids_at + 8 * n]) == tuple(POSITIONS)
    assert len(data) == ids_at + 8 * n + len(custom.pages) * store.pool.bytes_per_page
    assert len(read["empty.kv"]) == kv_format.size(store.pool, store.fingerprint, 0, 0)
    store.check_invariants()
