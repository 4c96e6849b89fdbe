"""Limits and fairness per user: one uid's programs cannot take the pool or the engine."""

from __future__ import annotations

import pytest
import torch
import trio

from symphony.engine.page_pool import PagePool
from symphony.engine.tokenizer import StreamDecoder, Tokenizer
from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT, Cred
from symphony.fs.store import KVStore
from symphony.sched.generation import GenerateState
from symphony.sched.outputs import SAMPLE
from symphony.sched.scheduler import Scheduler
from symphony.sched.tasks import Account, Task
from tests.test_scheduler import VOCAB, FakeEngine, run_until_done
from tests.tiny import tiny_tokenizer_json

OTHER = Cred(65534, 65534)


def generating(store: KVStore, account: Account, name: str, max_tokens: int) -> Task:
    file = store.open(name, ROOT, create=True)
    task = Task(account, file, [1, 2, 3], {2: SAMPLE})
    task.generate = GenerateState(
        max_tokens, frozenset(), (), StreamDecoder(Tokenizer(tiny_tokenizer_json())), None
    )
    return task


async def test_many_programs_of_one_uid_do_not_stall_another_uids_generation(autojump_clock):
    pool = PagePool(1, 512, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096)
    engine = FakeEngine()
    sched = Scheduler(engine, store, max_step_tokens=8)  # type: ignore[arg-type]
    root = Account(1, uid=0, tokens_computed=10_000)  # root has run for a while
    sched.uid_service[0] = 10_000
    flood = [Account(100 + i, uid=65534) for i in range(12)]
    gen = generating(store, root, "root.kv", 100)
    sched.submit(gen)
    engine.tags[gen.plan.block_table[0]] = 0
    prompts = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        while len(gen.generate.token_ids) < 2:  # root's generation is under way
            await trio.sleep(0.01)
        first = len(engine.steps)
        for i, account in enumerate(flood):
            file = store.open(f"f{i}", ROOT, create=True)
            t = Task(account, file, [1 + j % 30 for j in range(40)])
            sched.submit(t)
            engine.tags[t.plan.block_table[0]] = 1
            prompts.append(t)
        for t in [gen, *prompts]:
            await t.done.wait()
        nursery.cancel_scope.cancel()
    steps = engine.steps[first:]
    with_root = [i for i, step in enumerate(steps) if any(tag == 0 for tag, _ in step)]
    # root's generation rode in every step until it was done
    assert with_root == list(range(len(with_root))) and len(with_root) >= 50
    assert all(any(tag == 1 for tag, _ in step) for step in steps[1 : len(with_root)])
    assert gen.result["finish_reason"] == "length"
    assert sum(n for step in steps for tag, n in step if tag == 1) == 12 * 40
    for step in steps[: len(with_root)]:  # beside a decode, prefill got half a step
        assert sum(n for tag, n in step if tag == 1) <= 4
    store.check_invariants()


async def test_uids_take_turns_before_programs(autojump_clock):
    pool = PagePool(1, 512, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096)
    engine = FakeEngine()
    sched = Scheduler(engine, store, max_step_tokens=4)  # type: ignore[arg-type]
    sched.uid_service[65534] = 500  # 65534's programs have been served a lot, each little
    many = [Account(100 + i, uid=65534) for i in range(5)]
    one = Account(7, uid=1000, tokens_computed=100)
    tasks = []
    for i, account in enumerate([one, *many]):  # both uids wait: the less served goes first
        file = store.open(f"t{i}", ROOT, create=True)
        t = Task(account, file, [1, 2, 3, 4])
        sched.submit(t)
        engine.tags[t.plan.block_table[0]] = account.uid
        tasks.append(t)
    await run_until_done(sched, tasks)
    assert engine.steps[0] == [(1000, 4)]  # the less served uid first, despite its program


def test_a_uid_holds_its_share_and_root_still_gets_pages():
    pool = PagePool(1, 32, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096, uid_share=8)
    holder = store.charges.user(OTHER.uid)
    store.ns.chmod("", ROOT, 0o1777)
    taken = []
    with pytest.raises(StoreError) as info:
        for _ in range(20):
            taken += store.allocate(1, holder)
    assert info.value.errno_name == "ENOSPC" and "share" in str(info.value)
    assert len(taken) == 8 == holder.pages
    assert len(store.allocate(16, store.charges.user(0))) == 16  # root is not bounded
    pool.decref(taken[:3])  # freed pages are no longer held
    assert holder.pages == 5
    store.allocate(3, holder)


def test_a_page_quota_counts_pages_held_not_pages_ever_taken():
    pool = PagePool(1, 32, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096)
    holder = Holder(0, quota=3)
    file = store.open("q", ROOT, create=True)
    for _ in range(5):  # 12 tokens are 3 pages; rolled back, they are given back
        plan = store.begin_append(file, list(range(1, 13)), need_logits=False, holder=holder)
        store.finish_append(plan)
        assert holder.pages == 3
        with pytest.raises(StoreError):
            store.begin_append(file, [1], need_logits=False, holder=holder)
        store.truncate_file(file, 0)  # its pages are cached now: the next append evicts them
    store.check_invariants()


def test_many_decodes_of_one_uid_do_not_starve_anothers_prompt():
    """256 single-token calls of one uid and a prompt of another: the prompt's owner,
    the less served, gets into the very next step."""
    pool = PagePool(1, 1024, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096)
    sched = Scheduler(FakeEngine(), store, max_step_tokens=512)  # type: ignore[arg-type]
    for i in range(256):
        flood = Task(Account(100 + i, uid=65534), store.open(f"d{i}", ROOT, create=True), [3])
        sched.submit(flood)
    sched.uid_service[65534] = 10**6
    prompt = Task(Account(7, uid=0), store.open("p", ROOT, create=True), list(range(1, 30)))
    sched.submit(prompt)
    picked = [task for task, _ in sched._pick()]
    assert prompt in picked


async def test_a_uid_returning_after_a_long_rest_gets_no_credit(autojump_clock):
    pool = PagePool(1, 64, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096)
    sched = Scheduler(FakeEngine(), store, max_step_tokens=4)  # type: ignore[arg-type]
    sched.uid_service.update({0: 10_000_000, 65534: 0})  # root served for a day, 65534 idle
    sched.submit(Task(Account(1, uid=0), store.open("r", ROOT, create=True), [1, 2, 3, 4]))
    sched.submit(Task(Account(2, uid=65534), store.open("n", ROOT, create=True), [1, 2, 3, 4]))
    assert sched.uid_service[65534] == 10_000_000  # starts level with those waiting


def test_who_forks_another_uids_pages_holds_them():
    """B forks A's readable file: the pages are B's to hold from then on, so A's unlink
    gives A its share back (it used to stay charged for what B kept alive)."""
    from tests.test_kv_import import export

    pool = PagePool(1, 64, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 4096, uid_share=12)
    store.ns.chmod("", ROOT, 0o1777)
    a, b = Cred(1000, 1000), Cred(2000, 2000)
    holder_a, holder_b = store.charges.user(a.uid), store.charges.user(b.uid)
    file = store.ns.create_file("a.kv", a, 0o644, store.domain_of(a))
    ids = [1 + i % 30 for i in range(32)]
    plan = store.begin_append(file, ids, need_logits=False, holder=holder_a)
    store.finish_append(plan)
    for i, page in enumerate(file.pages):  # no engine here: pages told apart by hand
        pool.k_cache[0][page] = float(i + 1)
    assert (holder_a.pages, holder_b.pages) == (8, 0)
    store.fork("a.kv", "b.kv", b)
    assert (holder_a.pages, holder_b.pages) == (0, 8)
    store.unlink("a.kv", a)
    assert holder_a.pages == 0
    with pytest.raises(StoreError) as info:  # 8 more would take b past its share of 12
        store.fork("b.kv", "b2.kv", Cred(3000, 3000), holder=Holder(3000, quota=4))
    assert info.value.errno_name == "ENOSPC"
    assert "b2.kv" not in store.ns.listdir("", ROOT)
    # the same through bytes: a copy by content takes the pages over too
    data = export(store, "b.kv")  # read by root: noted in root's domain
    target = store.ns.create_file("r.kv", ROOT, 0o600, store.domain_of(ROOT))
    importer = store.importer(ROOT)
    importer.write(0, data)
    store.commit_import(target, importer)
    assert holder_b.pages == 0 and store.charges.by_uid[0] == 8
    store.unlink("b.kv", b)
    store.check_invariants()
