"""Exporting a KV file to bytes and importing them back, without a mount."""

from __future__ import annotations

import struct

import pytest

from symphony.fs import kv_format
from symphony.fs.errors import StoreError
from symphony.fs.kv_import import digest_of
from symphony.fs.nodes import ROOT, Cred
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine
from tests.test_store import append


@pytest.fixture
def store_and_data() -> tuple[KVStore, bytes]:
    """A store holding a.kv (18 tokens over 5 pages), and a.kv's bytes."""
    engine = make_tiny_engine(num_pages=32, page_size=4)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 512)
    append(engine, store, store.ns.create_file("a.kv", ROOT, 0o600, ""), list(range(5, 23)))
    return store, export(store, "a.kv")


def export(store: KVStore, path: str) -> bytes:
    """A file's bytes as reading it on the mount gives them (noting each page's content)."""
    file = store.ns.lookup_file(path, ROOT)
    lay = kv_format.layout(
        store.pool, store.fingerprint, file.token_ids, len(file.pages), file.position_list()
    )

    def page_at(i: int) -> bytes:
        filled = kv_format.slots_filled(lay.num_tokens, lay.page_size, i)
        data = store.pool.page_bytes(file.pages[i], filled)
        store.content.note(file.pages[i], filled, digest_of(data), store.domain_of(ROOT))
        return data

    return kv_format.read_range(lay, 0, lay.size, page_at)


def import_(store: KVStore, path: str, data: bytes, chunk: int) -> None:
    file = store.ns.create_file(path, ROOT, 0o600, "")
    importer = store.importer(ROOT)
    for off in range(0, len(data), chunk):
        importer.write(off, data[off : off + chunk])
    assert importer.complete()
    store.commit_import(file, importer)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_import_of_an_export_shares_every_page_whatever_the_write_sizes(store_and_data, chunk):
    store, data = store_and_data
    used = store.pool.num_used
    import_(store, "b.kv", data, chunk)
    assert store.pool.num_used == used  # no page taken: all found by content
    assert export(store, "b.kv") == data
    store.check_invariants()


def test_an_import_of_unknown_pages_fills_fresh_ones_and_reads_back_the_same(store_and_data):
    store, data = store_and_data
    store.unlink("a.kv", ROOT)
    assert store.index is not None
    store.index.clear()  # the pages are gone for good
    assert store.pool.num_used == 0
    import_(store, "b.kv", data, 1000)
    assert store.pool.num_used == 5
    assert export(store, "b.kv") == data
    store.check_invariants()


def test_holes_read_as_zeros_and_writes_out_of_order_or_far_away_are_einval(store_and_data):
    store, data = store_and_data
    importer = store.importer(ROOT)
    importer.write(0, data[:100])
    with pytest.raises(StoreError) as info:
        importer.write(50, data[50:60])
    assert info.value.errno_name == "EINVAL"
    far = store.importer(ROOT)
    with pytest.raises(StoreError) as info:
        far.write(1 << 40, b"x")  # `truncate -s 1T` on an import: refused, nothing allocated
    assert info.value.errno_name == "EINVAL"
    zeros = store.importer(ROOT)
    zeros.write(0, data[: len(data) - 10])
    zeros.extend_to(len(data))  # cp ending in a hole
    assert zeros.complete()
    zeros.abort()
    importer.abort()
    store.check_invariants()


def test_token_ids_outside_the_vocabulary_and_early_holes_are_einval(store_and_data):
    store, data = store_and_data
    (length,) = struct.unpack("<I", data[8:12])
    ids_at = 12 + length
    bad = data[:ids_at] + struct.pack("<i", store.vocab_size) + data[ids_at + 4 :]
    for attempt in (lambda i: i.write(0, bad), lambda i: i.write(ids_at - 8, data[ids_at - 8 :])):
        importer = store.importer(ROOT)
        with pytest.raises(StoreError) as info:
            attempt(importer)
        assert info.value.errno_name == "EINVAL"
        assert not importer.pages
    store.check_invariants()


def test_pages_are_shared_only_with_imports_of_a_user_who_read_them(store_and_data):
    store, data = store_and_data  # root read a.kv (the fixture exported it)
    used = store.pool.num_used
    other = Cred(1000, 1000)
    importer = store.importer(other)
    importer.write(0, data)
    assert importer.complete()
    assert store.pool.num_used == used + 5  # fresh pages: nothing learnt about root's
    importer.abort()
    store.check_invariants()


def test_unused_slots_of_a_last_page_read_as_zeros_whoever_had_the_page_before(
    store_and_data,
):
    store, data = store_and_data  # 18 tokens: the last page holds 2 of its 4 slots
    file = store.ns.lookup_file("a.kv", ROOT)
    last = file.pages[-1]
    for cache in (*store.pool.k_cache, *store.pool.v_cache):
        cache[last, 2:] = 7.0  # what a previous owner of the page left in it
    assert export(store, "a.kv") == data
    assert data.endswith(bytes(store.pool.bytes_per_page // (2 * len(store.pool.k_cache) * 2)))
