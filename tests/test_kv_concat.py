"""kv_concat (issue 11, item 5): a new file of several files' tokens in order, pieces
sharing pages where they land unmoved on a page boundary, moved and re-rotated otherwise."""

from __future__ import annotations

import errno

import pytest

from symphony.engine.engine import Engine
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT, Cred, imported_by
from symphony.fs.store import KVStore
from symphony.lipctl import SymphonyError, connect
from symphony.sched.control import parse_command
from tests.conftest import make_tiny_engine
from tests.logit_rows import close, logits

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65]  # 14 tokens
LONG = PROMPT * 2  # 28 tokens, 7 pages of 4
NEW = [100, 33, 10]
ASK = [{"at": [0, 1, 2], "logits": True}]
PS = 4  # the tiny server's page size
STRANGER = Cred(1234, 1234)


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


def split(lip, at: int, reposition: bool) -> None:  # type: ignore[no-untyped-def]
    """f.kv holds LONG; a.kv its first `at` tokens, b.kv the rest (moved to 0.. with
    `reposition`, else at their positions)."""
    f = lip.kv("f.kv", create=True)
    f.append(LONG)
    f.fork("a.kv").truncate(at)
    f.fork("b.kv").drop(0, at, reposition=reposition)


def files(tiny_server, *paths: str):  # type: ignore[no-untyped-def]
    store = tiny_server.server.store
    return [tiny_server.run_sync(store.ns.lookup_file, path, ROOT) for path in paths]


def kv_diff(tiny_server, a, b) -> float:  # type: ignore[no-untyped-def]
    pool = tiny_server.server.engine.pool
    return float(tiny_server.run_sync(pool.max_abs_diff, a.pages, b.pages, a.num_tokens))


def predictions(lip, path: str) -> dict:  # type: ignore[no-untyped-def]
    return lip.call("forward", path=path, tokens=NEW, keep=False, outputs=ASK)


@pytest.mark.parametrize("at", [8, 6])  # on a page boundary, and not
def test_a_file_split_and_concatenated_unmoved_is_the_file_again(lip, tiny_server, at) -> None:
    split(lip, at, reposition=False)
    used = lip.status()["pages"]["used"]
    c = lip.kv_concat("c.kv", ["a.kv", "b.kv"], reposition=False)
    stat = c.stat()
    assert (stat["tokens"], stat["next_position"], stat["mode"] & 0o777) == (28, 28, 0o600)
    f, a, b, joined = files(tiny_server, "f.kv", "a.kv", "b.kv", "c.kv")
    assert joined.token_ids == f.token_ids and joined.positions is None
    assert kv_diff(tiny_server, joined, f) == 0.0  # the same K/V bytes
    assert joined.pages[: at // PS] == a.pages[: at // PS]  # a's whole pages, shared
    if at % PS == 0:  # b lands unmoved on a page boundary: every page of it shared
        assert joined.pages[at // PS :] == b.pages and lip.status()["pages"]["used"] == used
    else:  # b's tokens (and a's partial page) copied
        assert set(joined.pages).isdisjoint(b.pages)
    assert joined.custom_from == at  # its second piece never saw its first
    for i in range(3):
        assert close(logits(predictions(lip, "c.kv"), i), logits(predictions(lip, "f.kv"), i))
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_pieces_moved_into_place_give_the_file_within_tolerance(lip, tiny_server) -> None:
    """b.kv was moved to positions 0.. by a repositioned drop; concatenated with
    reposition it follows a.kv again, its keys turned back: F's K/V within 1e-5."""
    split(lip, 6, reposition=True)
    assert lip.kv("b.kv").stat()["next_position"] == 22
    lip.kv_concat("c.kv", ["a.kv", "b.kv"])
    f, joined = files(tiny_server, "f.kv", "c.kv")
    assert joined.token_ids == f.token_ids and joined.positions is None
    assert kv_diff(tiny_server, joined, f) < 1e-5
    for i in range(3):
        assert close(logits(predictions(lip, "c.kv"), i), logits(predictions(lip, "f.kv"), i))
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_without_reposition_every_token_keeps_its_position(lip, tiny_server) -> None:
    a = lip.kv("a.kv", create=True)
    a.append(PROMPT[:5])
    lip.kv_concat("twice.kv", ["a.kv", "a.kv"], reposition=False)
    (twice,) = files(tiny_server, "twice.kv")
    assert twice.positions == [0, 1, 2, 3, 4] * 2 and twice.token_ids == PROMPT[:5] * 2
    lip.kv_concat("moved.kv", ["a.kv", "a.kv"])
    assert lip.kv("moved.kv").stat()["next_position"] == 10
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_writing_a_concatenation_never_writes_its_sources_pages(lip, tiny_server) -> None:
    """The concatenation shares pages with its sources: an append into its shared
    partial page, a drop over its shared pages, copy them first."""
    lip.kv("a.kv", create=True).append(PROMPT[:8])
    lip.kv("b.kv", create=True).append(PROMPT[3:13])  # lands at 8, its last page partial
    before = {p: predictions(lip, p) for p in ("a.kv", "b.kv")}
    c = lip.kv_concat("c.kv", ["a.kv", "b.kv"], reposition=False)
    assert c.stat()["shared_pages"] == 5  # a's 2, b's 3 (its partial one too)
    c.append(NEW)  # into b's partial page
    c.drop(9, 12, reposition=True)  # over b's pages: positions 4.. move down to 1..
    for path, result in before.items():
        for i in range(3):
            assert logits(predictions(lip, path), i) == logits(result, i)
    tiny_server.run_sync(tiny_server.server.store.check_invariants)
    lip.kv("a.kv").unlink()
    lip.kv("b.kv").unlink()
    assert c.stat()["tokens"] == 18  # whole after its sources are gone
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_refusals_name_the_problem_and_make_nothing(lip, tiny_server) -> None:
    lip.kv("a.kv", create=True).append(PROMPT)
    lip.kv("long.kv", create=True).append(PROMPT * 3)  # 42 tokens
    lip.kv("dst.kv", create=True)
    lip.call("kv_open", path="late.kv", create=True)
    lip.call("forward", path="late.kv", tokens=[5, 6, 7], positions=[2045, 2046, 2047])
    refused = [
        ("EINVAL", {"dst": "c.kv", "srcs": []}),
        ("EINVAL", {"dst": "c.kv", "srcs": ["a.kv"] * 65}),
        ("EINVAL", {"dst": "c.kv", "srcs": ["long.kv"] * 49}),  # 2058 tokens
        ("EINVAL", {"dst": "c.kv", "srcs": ["late.kv", "a.kv"]}),  # a would follow 2047
        ("ENOENT", {"dst": "c.kv", "srcs": ["a.kv", "missing.kv"]}),
        ("EEXIST", {"dst": "dst.kv", "srcs": ["a.kv"]}),
        ("EEXIST", {"dst": "a.kv", "srcs": ["a.kv"]}),
    ]
    used = lip.status()["pages"]["used"]
    for name, args in refused:
        with pytest.raises(SymphonyError) as info:
            lip.call("kv_concat", **args)
        assert info.value.errno == name, args
    assert "c.kv" not in lip.listdir() and lip.status()["pages"]["used"] == used
    lip.call("kv_concat", dst="c.kv", srcs=["late.kv", "a.kv"], reposition=False)  # unmoved
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_another_uid_cannot_concatenate_what_it_cannot_read(lip, tiny_server) -> None:
    lip.kv("private.kv", create=True).append(PROMPT)  # 0600, root's
    lip.kv("public.kv", create=True, mode=0o644).append(PROMPT)
    got = tiny_server.call_as(STRANGER, "kv_concat", dst="c.kv", srcs=["public.kv", "private.kv"])
    assert isinstance(got, StoreError) and got.errno == errno.EACCES
    assert "c.kv" not in lip.listdir()
    got = tiny_server.call_as(STRANGER, "kv_concat", dst="c.kv", srcs=["public.kv"])
    assert got["uid"] == STRANGER.uid and got["mode"] & 0o777 == 0o600
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_a_source_with_an_append_in_flight_is_ebusy(lip, tiny_server) -> None:
    lip.kv("a.kv", create=True).append(PROMPT)
    store = tiny_server.server.store

    def concat_while_appending() -> int:
        (a,) = files_now(store, "a.kv")
        plan = store.begin_append(a, [1, 2])
        try:
            store.concat("c.kv", ["a.kv"], ROOT)
        except StoreError as exc:
            return exc.errno
        finally:
            store.abort_append(plan)
        return 0

    assert tiny_server.run_sync(concat_while_appending) == errno.EBUSY
    assert "c.kv" not in lip.listdir()
    tiny_server.run_sync(store.check_invariants)


def files_now(store: KVStore, *paths: str):  # type: ignore[no-untyped-def]
    return [store.ns.lookup_file(path, ROOT) for path in paths]


def test_a_concatenation_of_an_imported_file_is_imported(lip, tiny_server) -> None:
    lip.kv("a.kv", create=True).append(PROMPT)
    lip.kv("b.kv", create=True).append(PROMPT)
    (b,) = files(tiny_server, "b.kv")
    tiny_server.run_sync(setattr, b, "origin", imported_by(77))  # as uid 77's import leaves it
    assert lip.kv_concat("c.kv", ["a.kv", "b.kv"]).stat()["origin"] == "imported by uid 77"
    assert lip.kv_concat("d.kv", ["a.kv"]).stat()["origin"] == "computed"


def test_ctl_takes_the_sources_as_words() -> None:
    assert parse_command("kv_concat all.kv a.kv 42 reposition=false") == (
        "kv_concat",
        {"dst": "all.kv", "srcs": ["a.kv", "42"], "reposition": False},
    )


# the pool short: a store of its own, so that the numbers are exact -------------------


def small_store(uid_share: int | None = None) -> tuple[Engine, KVStore]:
    """12 pages of 4, and the engine that computes into them."""
    engine = make_tiny_engine(num_pages=12, page_size=PS)
    store = KVStore(
        engine.pool,
        engine.fingerprint,
        engine.model_config.vocab_size,
        512,
        uid_share=uid_share,
        rotate_keys=engine.rotate_keys,
    )
    store.ns.chmod("", ROOT, 0o777)
    return engine, store


def compute(engine: Engine, store: KVStore, path: str, ids: list[int], cred: Cred = ROOT) -> None:
    """A file at `path` (mode 0644) holding `ids`, its pages charged to `cred`'s uid."""
    file = store.open(path, cred, create=True, mode=0o644)
    plan = store.begin_append(file, ids, holder=store.charges.user(cred.uid))
    engine.step([plan.chunk()])
    store.finish_append(plan)


def test_a_pool_too_short_is_enospc_and_takes_nothing() -> None:
    engine, store = small_store()
    compute(engine, store, "a.kv", LONG)  # 7 pages of 12
    free = store.pool.num_free
    with pytest.raises(StoreError) as info:  # a moved copy of a needs 7 more
        store.concat("c.kv", ["a.kv", "a.kv"], ROOT)
    assert info.value.errno == errno.ENOSPC
    assert store.pool.num_free == free and "c.kv" not in store.ns.listdir("", ROOT)
    store.check_invariants()
    store.concat("c.kv", ["a.kv", "a.kv"], ROOT, reposition=False)  # shared: no page taken
    assert store.pool.num_free == free
    store.check_invariants()


def test_pages_taken_over_past_the_uid_share_are_enospc_and_charge_nothing() -> None:
    """Sharing another uid's pages charges them to the one who concatenates (as a fork
    does): past its share, nothing is made and its charges are as they were."""
    alice, bob = Cred(1000, 1000), Cred(1001, 1001)
    engine, store = small_store(uid_share=5)
    compute(engine, store, "alice.kv", PROMPT[:12], alice)  # 3 pages each
    compute(engine, store, "bob.kv", PROMPT[2:14], bob)
    held, free = store.charges.by_uid[bob.uid], store.pool.num_free
    with pytest.raises(StoreError) as info:
        store.concat("c.kv", ["alice.kv", "bob.kv"], bob, reposition=False)
    assert info.value.errno == errno.ENOSPC
    assert (store.charges.by_uid[bob.uid], store.pool.num_free) == (held, free)
    assert "c.kv" not in store.ns.listdir("", bob)
    store.check_invariants()
