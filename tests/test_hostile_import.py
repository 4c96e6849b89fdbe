"""Imported KV bytes are untrusted: checked values, recorded provenance, never indexed.

The attack: a file whose token ids say one prompt over pages computed from another,
imported by uid 65534; root forks it and generates; root's later genuine computation of
the same tokens must not reuse anything derived from the imported pages.
"""

from __future__ import annotations

import struct

import pytest
import torch

from symphony.fs import kv_format
from symphony.fs.errors import StoreError
from symphony.fs.nodes import COMPUTED, ROOT, Cred
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine
from tests.test_kv_import import export
from tests.test_store import append, fresh_logits

OTHER = Cred(65534, 65534)
PS = 4
SPAIN = list(range(40, 58))  # 18 tokens: 4 full pages and a partial one
FRANCE = list(range(60, 78))


@pytest.fixture
def setup():  # type: ignore[no-untyped-def]
    engine = make_tiny_engine(num_pages=64, page_size=PS)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 512)
    store.ns.chmod("", ROOT, 0o1777)
    return engine, store


def forged(store: KVStore, engine) -> bytes:  # type: ignore[no-untyped-def]
    """Bytes whose token ids are FRANCE over the pages of a SPAIN computation."""
    spain = store.ns.create_file("spain.kv", OTHER, 0o600, store.domain_of(OTHER))
    append(engine, store, spain, SPAIN)
    data = bytearray(export(store, "spain.kv"))
    lay = kv_format.layout(store.pool, store.fingerprint, SPAIN, len(spain.pages))
    ids_at = len(lay.head) - 8 * len(SPAIN)  # the ids, then as many positions
    data[ids_at : ids_at + 4 * len(SPAIN)] = struct.pack(f"<{len(FRANCE)}i", *FRANCE)
    store.unlink("spain.kv", OTHER)
    return bytes(data)


def import_as(store: KVStore, cred: Cred, path: str, data: bytes) -> None:
    file = store.ns.create_file(path, cred, 0o644, store.domain_of(cred))
    importer = store.importer(cred)
    importer.write(0, data)
    assert importer.complete()
    store.commit_import(file, importer)


def test_nothing_derived_from_an_import_enters_the_index(setup):
    engine, store = setup
    # root once computed the first 16 tokens for real: those pages are in its index
    early = store.ns.create_file("early.kv", ROOT, 0o600, store.domain_of(ROOT))
    append(engine, store, early, FRANCE[:16])
    import_as(store, OTHER, "fake.kv", forged(store, engine))
    assert store.stat("fake.kv", OTHER)["origin"] == "imported by uid 65534"
    fork = store.fork("fake.kv", "mine.kv", ROOT)
    assert store.file_stat(fork)["origin"] == "imported by uid 65534"  # forks carry it
    append(engine, store, fork, list(range(100, 110)))  # copies the partial page, appends
    assert store.file_stat(fork)["origin"] == "imported by uid 65534"  # appends keep it
    # root computes FRANCE for real: nothing of the fork's may be reused
    genuine = store.ns.create_file("genuine.kv", ROOT, 0o600, store.domain_of(ROOT))
    logits = append(engine, store, genuine, FRANCE + list(range(100, 110)))
    assert not set(genuine.pages) & set(fork.pages)
    assert genuine.pages[:4] == early.pages  # the genuine prefix is still reused
    assert store.file_stat(genuine)["origin"] == COMPUTED
    assert logits is not None
    torch.testing.assert_close(logits[-1], fresh_logits(engine, FRANCE + list(range(100, 110)))[-1])
    store.check_invariants()


def test_rolling_an_import_back_to_nothing_makes_it_computed(setup):
    engine, store = setup
    import_as(store, OTHER, "fake.kv", forged(store, engine))
    store.truncate("fake.kv", 3, OTHER)
    assert store.stat("fake.kv", OTHER)["origin"] != COMPUTED
    store.truncate("fake.kv", 0, OTHER)
    assert store.stat("fake.kv", OTHER)["origin"] == COMPUTED


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e6])
def test_an_import_with_values_out_of_range_is_refused_and_takes_no_page(setup, value):
    engine, store = setup
    file = store.ns.create_file("a.kv", ROOT, 0o600, store.domain_of(ROOT))
    append(engine, store, file, SPAIN)
    data = bytearray(export(store, "a.kv"))
    used = store.pool.num_used
    # one float of the third page's K/V
    at = len(data) - 2 * engine.pool.bytes_per_page - 100 * 4
    data[at : at + 4] = struct.pack("<f", value)
    target = store.ns.create_file("b.kv", ROOT, 0o600, store.domain_of(ROOT))
    importer = store.importer(ROOT)
    with pytest.raises(StoreError) as info:
        importer.write(0, bytes(data))
    assert info.value.errno_name == "EINVAL"
    assert target.num_tokens == 0
    assert store.pool.num_used == used
    store.check_invariants()


def test_kv_verify_reports_the_deviation_and_adopts_a_match(tiny_server):
    """A faithful import verifies and becomes computed; a forged one does not."""
    from symphony.lipctl import connect

    srv = tiny_server.server
    with connect(srv.config.socket_path) as lip:
        kv = lip.kv("real.kv", create=True)
        kv.append(SPAIN)
        report = kv.kv_verify()
        assert report["match"] and report["max_abs_diff"] <= report["tolerance"]
        assert report["origin"] == COMPUTED
    store = srv.store

    def imports() -> None:
        data = export(store, "real.kv")
        import_as(store, ROOT, "copy.kv", data)
        import_as(store, ROOT, "fake.kv", forged(store, srv.engine))

    tiny_server.run_sync(imports)
    with connect(srv.config.socket_path) as lip:
        copy, fake = lip.kv("copy.kv"), lip.kv("fake.kv")
        assert copy.stat()["origin"] == fake.stat()["origin"] == "imported by uid 0"
        good, bad = copy.kv_verify(), fake.kv_verify()
        assert good["match"] and good["origin"] == COMPUTED == copy.stat()["origin"]
        assert not bad["match"] and bad["max_abs_diff"] > 10 * bad["tolerance"]
        assert fake.stat()["origin"] == "imported by uid 0"
    tiny_server.run_sync(store.check_invariants)


def test_a_pool_running_out_mid_import_says_enospc_on_every_later_write(setup):
    """cp writes again after a short write: the next write must say why, not EINVAL."""
    engine, store = setup
    file = store.ns.create_file("a.kv", ROOT, 0o600, store.domain_of(ROOT))
    append(engine, store, file, SPAIN)
    data = bytearray(export(store, "a.kv"))
    data[-100] ^= 1  # a page nobody holds: it needs a fresh one
    hog = store.allocate(store.pool.num_free)  # and the pool is full
    importer = store.importer(Cred(5, 5))
    half = len(data) // 2
    with pytest.raises(StoreError) as first:
        importer.write(0, bytes(data[:half]))
        importer.write(half, bytes(data[half:]))
    with pytest.raises(StoreError) as later:
        importer.write(len(data), b"")
    assert first.value.errno_name == later.value.errno_name == "ENOSPC"
    store.pool.decref(hog)
    store.check_invariants()


def test_kv_verify_by_a_reader_reports_but_changes_nothing(tiny_server):
    """Adopting the recomputed pages changes the file: a reader who may not write gets
    the report only."""
    from symphony.lipctl import connect

    srv = tiny_server.server
    with connect(srv.config.socket_path) as lip:
        lip.kv("real.kv", create=True).append(SPAIN)

    def copy() -> None:
        import_as(srv.store, ROOT, "copy.kv", export(srv.store, "real.kv"))  # mode 0644

    tiny_server.run_sync(copy)
    file = tiny_server.run_sync(lambda: srv.store.ns.lookup_file("copy.kv", ROOT))
    mtime, pages = file.mtime_ns, list(file.pages)
    report = tiny_server.call_as(OTHER, "kv_verify", path="copy.kv")
    assert report["match"] and report["origin"] == "imported by uid 0"
    assert (file.mtime_ns, file.pages, file.origin) == (mtime, pages, "imported by uid 0")
    tiny_server.run_sync(srv.store.check_invariants)
