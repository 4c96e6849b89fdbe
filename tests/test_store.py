"""KV store scenarios on the tiny engine, with check_invariants() after each."""

from __future__ import annotations

import errno

import pytest
import torch

from symphony.engine.engine import Engine
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT, Cred
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine

PS = 4  # the tiny engine's page size
ALICE = Cred(1000, 1000)
BOB = Cred(1001, 1001)


@pytest.fixture
def engine() -> Engine:
    return make_tiny_engine(num_pages=32, page_size=PS)


@pytest.fixture
def store(engine: Engine) -> KVStore:
    s = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 512)
    s.ns.chmod("", ROOT, 0o777)
    return s


def append(engine: Engine, store: KVStore, file, ids: list[int]) -> torch.Tensor | None:
    """Append through the store and the engine, as the scheduler does."""
    plan = store.begin_append(file, ids)
    try:
        logits = engine.step([plan.chunk()]) if plan.compute_ids else None
    except BaseException:
        store.abort_append(plan)
        raise
    store.finish_append(plan)
    store.check_invariants()
    return logits


def fresh_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits of the last token of `ids` computed from scratch in new pages."""
    pages = engine.pool.allocate(engine.pages_for(len(ids)))
    try:
        from symphony.engine.batch import SeqChunk

        return engine.step([SeqChunk(ids, 0, pages)])
    finally:
        engine.pool.decref(pages)


def test_fork_shares_every_page_and_copies_on_write(engine, store):
    a = store.open("a.kv", ROOT, create=True)
    append(engine, store, a, list(range(10, 20)))  # 10 tokens: 2 full pages + 2 slots
    used = engine.pool.num_used
    b = store.fork("a.kv", "b.kv", ROOT)
    assert engine.pool.num_used == used  # no page copied
    assert store.stat("b.kv", ROOT)["shared_pages"] == 3
    assert store.status()["pages"]["shared"] == 3
    store.check_invariants()
    # appending to b writes into the shared partial page: b gets its own copy of it
    got = append(engine, store, b, [30, 31])
    assert store.stat("a.kv", ROOT)["tokens"] == 10
    assert store.stat("b.kv", ROOT)["shared_pages"] == 2
    assert a.pages[:2] == b.pages[:2] and a.pages[2] != b.pages[2]
    torch.testing.assert_close(got, fresh_logits(engine, [*range(10, 20), 30, 31]))
    # a's own continuation is unaffected by b's
    got_a = append(engine, store, a, [40])
    torch.testing.assert_close(got_a, fresh_logits(engine, [*range(10, 20), 40]))


def test_truncate_rolls_back_and_regenerates_the_same(engine, store):
    f = store.open("t.kv", ROOT, create=True)
    first = append(engine, store, f, list(range(3, 12)))
    append(engine, store, f, [50, 51, 52, 53, 54])
    store.truncate("t.kv", 8, ROOT)
    st = store.stat("t.kv", ROOT)
    assert (st["tokens"], st["pages"]) == (8, 2)
    store.check_invariants()
    again = append(engine, store, f, [11])  # token 9 of the original prompt
    torch.testing.assert_close(again, first)
    store.truncate("t.kv", 0, ROOT)
    assert store.stat("t.kv", ROOT)["pages"] == 0
    with pytest.raises(StoreError) as info:
        store.truncate("t.kv", 5, ROOT)
    assert info.value.errno == errno.EINVAL
    store.check_invariants()


def test_unlink_while_forked_keeps_the_fork_whole(engine, store):
    a = store.open("a.kv", ROOT, create=True)
    append(engine, store, a, list(range(3, 16)))
    b = store.fork("a.kv", "b.kv", ROOT)
    store.unlink("a.kv", ROOT)
    store.check_invariants()
    assert store.stat("b.kv", ROOT)["shared_pages"] == 0
    got = append(engine, store, b, [7])
    torch.testing.assert_close(got, fresh_logits(engine, [*range(3, 16), 7]))
    store.unlink("b.kv", ROOT)
    store.check_invariants()
    assert store.status()["pages"]["used"] == 0


def test_prefix_hit_attaches_pages_instead_of_computing(engine, store):
    prompt = list(range(20, 33))  # 13 tokens: 3 full pages
    a = store.open("a.kv", ROOT, create=True)
    append(engine, store, a, prompt)
    b = store.open("b.kv", ROOT, create=True)
    plan = store.begin_append(b, [*prompt, 99])
    assert plan.num_reused == 12
    assert plan.block_table[:3] == a.pages[:3]
    logits = engine.step([plan.chunk()])
    store.finish_append(plan)
    store.check_invariants()
    torch.testing.assert_close(logits, fresh_logits(engine, [*prompt, 99]))
    # a miss: same tokens after a different first page
    c = store.open("c.kv", ROOT, create=True)
    plan = store.begin_append(c, [0, *prompt])
    assert plan.num_reused == 0
    store.abort_append(plan)
    store.check_invariants()


def test_indexed_pages_outlive_their_file_until_evicted(engine, store):
    prompt = list(range(40, 57))  # 17 tokens: 4 full pages, 1 partial
    f = store.open("f.kv", ROOT, create=True)
    append(engine, store, f, prompt)
    store.unlink("f.kv", ROOT)
    status = store.status()["pages"]
    assert (status["used"], status["cached"]) == (0, 4)
    g = store.open("g.kv", ROOT, create=True)
    plan = store.begin_append(g, prompt)
    assert plan.num_reused == 16
    store.abort_append(plan)
    # fill the pool: the cached pages are evicted, least recently used first
    big = store.open("big.kv", ROOT, create=True)
    append(engine, store, big, [5] * (PS * engine.pool.num_pages - 2))
    assert store.status()["pages"]["cached"] == 0
    store.check_invariants()


def test_out_of_pages_is_enospc_and_leaves_the_file_as_it_was(engine, store):
    f = store.open("f.kv", ROOT, create=True)
    append(engine, store, f, [1, 2, 3])
    with pytest.raises(StoreError) as info:
        store.begin_append(f, [4] * (PS * engine.pool.num_pages))
    assert info.value.errno == errno.ENOSPC
    assert store.stat("f.kv", ROOT)["tokens"] == 3
    store.check_invariants()


def test_a_failed_computation_gives_everything_back(engine, store):
    f = store.open("f.kv", ROOT, create=True)
    append(engine, store, f, [1, 2, 3])
    g = store.fork("f.kv", "g.kv", ROOT)
    before = engine.pool.num_used
    plan = store.begin_append(g, list(range(9)))
    assert engine.pool.num_used > before
    store.abort_append(plan)
    assert engine.pool.num_used == before
    assert store.stat("g.kv", ROOT)["tokens"] == 3
    store.check_invariants()


def test_bad_tokens_and_busy_files_are_refused(engine, store):
    f = store.open("f.kv", ROOT, create=True)
    for bad in ([], [-1], [engine.model_config.vocab_size], ["a"], [1] * 600):
        with pytest.raises(StoreError) as info:
            store.begin_append(f, bad)
        assert info.value.errno == errno.EINVAL
    plan = store.begin_append(f, [1, 2])
    with pytest.raises(StoreError) as info:
        store.begin_append(f, [3])
    assert info.value.errno == errno.EBUSY
    store.unlink("f.kv", ROOT)  # unlinked while busy: pages go when the append ends
    store.abort_append(plan)
    store.check_invariants()
    assert engine.pool.num_used == 0


def test_mode_bits_and_cache_domains(engine, store):
    secret = store.open("secret.kv", ROOT, create=True)
    prompt = list(range(60, 69))
    append(engine, store, secret, prompt)
    for op in (
        lambda: store.open("secret.kv", ALICE),
        lambda: store.fork("secret.kv", "mine.kv", ALICE),
        lambda: store.truncate("secret.kv", 1, ALICE),
    ):
        with pytest.raises(StoreError) as info:
            op()
        assert info.value.errno_name == "EACCES"
    # alice's own file with the same prompt gets no hit from root's pages
    mine = store.open("mine.kv", ALICE, create=True)
    plan = store.begin_append(mine, prompt)
    assert plan.num_reused == 0
    store.abort_append(plan)
    # files made through the store are 0600 by default; bob cannot read alice's
    assert store.stat("mine.kv", ALICE)["mode"] & 0o777 == 0o600
    with pytest.raises(StoreError):
        store.open("mine.kv", BOB)
    store.ns.mkdir("shared", ALICE, 0o755)
    with pytest.raises(StoreError) as info:
        store.open("shared/x.kv", BOB, create=True)
    assert info.value.errno_name == "EACCES"
    store.check_invariants()


def test_namespace_operations(engine, store):
    store.ns.mkdir("d", ROOT)
    f = store.open("d/a.kv", ROOT, create=True)
    append(engine, store, f, [1, 2, 3, 4, 5])
    store.ns.link("d/a.kv", "hard.kv", ROOT)
    store.ns.rename("d/a.kv", "d/b.kv", ROOT)
    assert store.ns.listdir("d", ROOT) == ["b.kv"]
    with pytest.raises(StoreError) as info:
        store.ns.rmdir("d", ROOT)
    assert info.value.errno_name == "ENOTEMPTY"
    store.unlink("d/b.kv", ROOT)
    assert store.stat("hard.kv", ROOT)["tokens"] == 5  # the other name keeps it
    store.ns.rmdir("d", ROOT)
    for bad in ("../x", "a/./b"):
        with pytest.raises(StoreError) as info:
            store.open(bad, ROOT, create=True)
        assert info.value.errno_name == "EINVAL"
    store.open("new.kv", ROOT, create=True, exclusive=True)
    with pytest.raises(StoreError) as info:
        store.open("new.kv", ROOT, create=True, exclusive=True)
    assert info.value.errno_name == "EEXIST"
    store.check_invariants()


def test_a_fork_by_another_user_looks_up_prefixes_in_its_own_domain(engine, store):
    prompt, more = list(range(60, 68)), list(range(70, 78))  # two pages, then two more
    public = store.open("public.kv", ROOT, create=True, mode=0o644)
    append(engine, store, public, prompt)
    longer = store.fork("public.kv", "longer.kv", ROOT)
    append(engine, store, longer, more)  # root's index now holds the pages of `more`
    mine = store.fork("public.kv", "mine.kv", ALICE)
    assert mine.domain != public.domain
    plan = store.begin_append(mine, [*more, 1])
    assert plan.num_reused == 0  # root's continuation stays root's
    store.abort_append(plan)
    theirs = store.fork("public.kv", "theirs.kv", ROOT)
    plan = store.begin_append(theirs, [*more, 1])
    assert plan.num_reused == 8  # while root's own fork does hit it
    store.abort_append(plan)
    store.check_invariants()


def test_recomputing_the_last_token_leaves_the_file_as_it_was(engine, store):
    f = store.open("r.kv", ROOT, create=True)
    want = append(engine, store, f, list(range(3, 11)))  # 8 tokens: two full, indexed pages
    g = store.fork("r.kv", "g.kv", ROOT)
    plan = store.begin_append(g, [], recompute_last=True)
    assert plan.replaced is not None  # the shared, indexed last page is not written
    got = engine.step([plan.chunk()])
    store.finish_append(plan)
    torch.testing.assert_close(got, want)
    assert g.token_ids == f.token_ids and g.pages[0] == f.pages[0] and g.pages[1] != f.pages[1]
    plan = store.begin_append(g, [], recompute_last=True)
    store.abort_append(plan)
    assert store.stat("g.kv", ROOT)["tokens"] == 8
    store.check_invariants()
