"""The batch loop on a fake engine: order, priorities, token budget, no idle engine."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import trio
import trio.testing

from symphony.engine.page_pool import PagePool
from symphony.engine.sampling import GREEDY
from symphony.fs.nodes import ROOT
from symphony.fs.store import KVStore
from symphony.sched.outputs import SAMPLE
from symphony.sched.scheduler import Scheduler
from symphony.sched.tasks import Account, Task

VOCAB = 32


class FakeEngine:
    """Records each step's chunks; logits favour token (position % VOCAB)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.steps: list[list[tuple[int, int]]] = []  # per step: (file tag, num tokens)
        self.times: list[tuple[float, float]] = []
        self.gate = gate
        self.tags: dict[int, int] = {}  # first page -> tag

    def step(self, chunks):
        t0 = time.monotonic()
        if self.gate is not None:
            self.gate.wait(10)
        self.steps.append([(self.tags.get(c.block_table[0], -1), c.num_tokens) for c in chunks])
        rows = []
        for c in chunks:
            for r in c.returned_rows:
                pos = c.start_pos + r
                row = torch.zeros(VOCAB)
                row[(pos + 1) % VOCAB] = 1.0
                rows.append(row)
        self.times.append((t0, time.monotonic()))
        return torch.stack(rows) if rows else torch.zeros(0, VOCAB)


def setup(budget: int, gate: threading.Event | None = None):
    pool = PagePool(1, 64, 4, 1, 2, torch.float32, "cpu")
    store = KVStore(pool, "fake", VOCAB, 1024)
    engine = FakeEngine(gate)
    return engine, store, Scheduler(engine, store, max_step_tokens=budget)  # type: ignore[arg-type]


def task(engine, store, name: str, account: Account, tokens: list[int], tag: int, want="sample"):
    file = store.open(name, ROOT, create=True)
    outputs = {len(tokens) - 1: SAMPLE} if want == "sample" else {}
    t = Task(account, file, tokens, outputs, GREEDY if want == "sample" else None)
    return t, tag


def submit(engine, sched, t_tag) -> Task:
    t, tag = t_tag
    sched.submit(t)
    engine.tags[t.plan.block_table[0]] = tag
    return t


async def run_until_done(sched, tasks):
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        for t in tasks:
            await t.done.wait()
        nursery.cancel_scope.cancel()


async def test_least_attained_service_goes_first(autojump_clock):
    engine, store, sched = setup(budget=4)
    busy, fresh = Account(1, tokens_computed=100), Account(2)
    a = submit(engine, sched, task(engine, store, "a", busy, [1, 2, 3, 4], tag=1))
    b = submit(engine, sched, task(engine, store, "b", fresh, [5, 6, 7, 8], tag=2))
    await run_until_done(sched, [a, b])
    assert engine.steps == [[(2, 4)], [(1, 4)]]
    assert (a.result["token"], b.result["token"]) == (4, 4)  # position 3 -> token 4


async def test_priority_class_beats_attained_service(autojump_clock):
    engine, store, sched = setup(budget=4)
    important, other = Account(1, priority=1, tokens_computed=10_000), Account(2)
    a = submit(engine, sched, task(engine, store, "a", other, [1, 2, 3, 4], tag=1))
    b = submit(engine, sched, task(engine, store, "b", important, [1, 2, 3, 4], tag=2))
    await run_until_done(sched, [a, b])
    assert engine.steps[0] == [(2, 4)]


async def test_token_budget_splits_prefill_and_packs_decodes(autojump_clock):
    engine, store, sched = setup(budget=5)
    long = submit(
        engine,
        sched,
        task(engine, store, "p", Account(1, tokens_computed=50), list(range(12)), tag=1),
    )
    decodes = [
        submit(engine, sched, task(engine, store, f"d{i}", Account(10 + i), [3], tag=10 + i))
        for i in range(3)
    ]
    await run_until_done(sched, [long, *decodes])
    assert all(sum(n for _, n in step) <= 5 for step in engine.steps)
    assert sum(n for step in engine.steps for tag, n in step if tag == 1) == 12
    # the decodes (least service) ride in the first step beside a prefill chunk
    assert sorted(engine.steps[0]) == [(1, 2), (10, 1), (11, 1), (12, 1)]
    assert long.result["tokens"] == 12
    store.check_invariants()


async def test_generation_continues_in_later_steps_and_appends_everything(autojump_clock):
    from symphony.engine.tokenizer import StreamDecoder, Tokenizer
    from symphony.sched.generation import GenerateState
    from tests.tiny import tiny_tokenizer_json

    engine, store, sched = setup(budget=8)
    state = GenerateState(5, frozenset(), (), StreamDecoder(Tokenizer(tiny_tokenizer_json())), None)
    t, tag = task(engine, store, "g", Account(1), [1, 2, 3], tag=1)
    t.generate = state
    submit(engine, sched, (t, tag))
    await run_until_done(sched, [t])
    assert t.result["token_ids"] == [3, 4, 5, 6, 7]
    assert t.file.token_ids == [1, 2, 3, 3, 4, 5, 6, 7]
    assert t.result["finish_reason"] == "length"
    store.check_invariants()


async def test_cancelled_task_gives_its_pages_back(autojump_clock):
    engine, store, sched = setup(budget=2)
    t = submit(engine, sched, task(engine, store, "c", Account(1), list(range(10)), tag=1))
    used = store.pool.num_used
    assert used > 0
    sched.cancel(t)
    await run_until_done(sched, [t])
    assert t.error is not None and t.error.errno_name == "ECANCELED"
    assert store.pool.num_used == 0
    store.check_invariants()


async def test_the_next_step_starts_as_soon_as_the_engine_is_free():
    gate = threading.Event()
    engine, store, sched = setup(budget=4, gate=gate)
    a = submit(engine, sched, task(engine, store, "a", Account(1), [1, 2, 3, 4], tag=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(0.05)  # step 1 is in the engine thread, held at the gate
        b = submit(engine, sched, task(engine, store, "b", Account(2), [1, 2], tag=2))
        gate.set()
        await a.done.wait()
        await b.done.wait()
        nursery.cancel_scope.cancel()
    assert engine.steps == [[(1, 4)], [(2, 2)]]
    (_, end1), (start2, _) = engine.times
    assert start2 - end1 < 0.5  # no waiting for a timer or a new call in between


def test_a_step_needs_a_budget():
    pool = PagePool(1, 4, 4, 1, 2, torch.float32, "cpu")
    with pytest.raises(ValueError):
        Scheduler(FakeEngine(), KVStore(pool, "f", VOCAB, 64), max_step_tokens=0)  # type: ignore[arg-type]
