"""Random sequences of store operations keep every invariant and every file's meaning."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symphony.engine.batch import SeqChunk
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine

NAMES = ["a", "b", "c"]

operation = st.one_of(
    st.tuples(
        st.just("append"),
        st.sampled_from(NAMES),
        st.lists(st.integers(1, 8), min_size=1, max_size=11),
    ),
    st.tuples(st.just("fork"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), st.integers(0, 30)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES), st.none()),
)


def last_logits_fresh(engine, store: KVStore, ids: list[int]):
    """The last token's logits computed from scratch, or None if the pool has no room."""
    need = engine.pages_for(len(ids))
    if store.index is not None:
        store.index.evict(need)
    if engine.pool.num_free < need:
        return None
    pages = engine.pool.allocate(need)
    try:
        return engine.step([SeqChunk(ids, 0, pages)])
    finally:
        engine.pool.decref(pages)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=12))
def test_random_operations(ops):
    engine = make_tiny_engine(num_pages=24, page_size=4)  # fresh per example
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    model: dict[str, list[int]] = {}  # what each file should hold
    for op, name, arg in ops:
        try:
            if op == "append":
                file = store.open(name, ROOT, create=True)
                model.setdefault(name, [])
                plan = store.begin_append(file, arg)
                logits = engine.step([plan.chunk()])
                store.finish_append(plan)
                model[name] += arg
                # what the store computed equals a computation from scratch
                fresh = last_logits_fresh(engine, store, model[name])
                if fresh is not None:
                    assert (logits - fresh).abs().max().item() < 1e-4
            elif op == "fork":
                store.fork(name, arg, ROOT)
                model[arg] = list(model[name])
            elif op == "truncate":
                store.truncate(name, arg, ROOT)
                model[name] = model[name][:arg]
            else:
                store.unlink(name, ROOT)
                del model[name]
        except StoreError:
            pass  # ENOENT, EEXIST, EINVAL, ENOSPC: refused, and nothing changed
        store.check_invariants()
        for n, ids in model.items():
            assert store.ns.lookup_file(n, ROOT).token_ids == ids
    for n in list(model):
        store.unlink(n, ROOT)
    if store.index is not None:
        store.index.clear()
    store.check_invariants()
    assert engine.pool.num_used == 0
