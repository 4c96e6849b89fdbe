"""The batch loop: appends and generations of many programs, packed into engine steps.

Each step takes decode tokens and prefill chunks up to a token budget, programs with
the least attained service first within priority classes (program-level fairness, as
in Autellix's PLAS). The engine runs on the engine thread (sched/engine_thread.py); the
next step starts as soon as the last one returns and work waits.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import trio

from symphony.engine.batch import SeqChunk
from symphony.engine.engine import Engine
from symphony.fs.appends import AppendPlan
from symphony.fs.errors import StoreError
from symphony.fs.store import KVStore
from symphony.sched import constrained as grammar_steps
from symphony.sched.engine_thread import EngineThread
from symphony.sched.outputs import OutputSpec
from symphony.sched.step import compute_step
from symphony.sched.tasks import Task

log = logging.getLogger(__name__)

MAX_GATHER = 0.02  # seconds the loop may wait for returning per-token programs


_NONE = OutputSpec()


class Scheduler:
    """Owns the engine thread; tasks go in with `submit` and come out through `task.done`."""

    def __init__(
        self,
        engine: Engine,
        store: KVStore,
        max_step_tokens: int = 512,
        max_step_seqs: int = 256,
        engine_thread: EngineThread | None = None,
    ) -> None:
        if max_step_tokens < 1 or max_step_seqs < 1:
            raise ValueError("a step must take at least one token of one sequence")
        self.engine = engine
        self.store = store
        self.max_step_tokens = max_step_tokens
        self.max_step_seqs = max_step_seqs
        # where the engine computes, best the thread that loaded it; None: one of the
        # scheduler's own while it runs
        self.engine_thread = engine_thread
        self.masker = grammar_steps.Masker()  # grammars' masks, while the engine computes
        self._waiting: list[Task] = []
        self._wake = trio.Event()
        self.after_step: Callable[[], None] | None = None  # the mount's cache invalidation
        self.uid_service: Counter[int] = Counter()  # tokens computed per uid
        self.num_steps = 0
        self.num_tokens = 0
        self.busy_seconds = 0.0

    # the outside --------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue `task`, beginning its append now so a refusal comes back at once.

        Raises:
            StoreError: EINVAL, EBUSY or ENOSPC from the store, or the page quota.
        """
        self.submit_many([task])

    def submit_many(self, tasks: Sequence[Task]) -> None:
        """Queue `tasks` to be computed together (in the same steps, as far as the
        budget goes): all begin, or none does.

        Raises:
            StoreError: the first refusal, its message naming the task by index when
                there are several.
        """
        for i, task in enumerate(tasks):
            try:
                self._begin(task)
            except StoreError as exc:
                for begun in tasks[:i]:
                    assert begun.plan is not None
                    self.store.abort_append(self._drop_plan(begun))
                if len(tasks) > 1:
                    raise StoreError(exc.errno, f"calls[{i}]: {exc.args[0]}") from None
                raise
        gang = min(task.arrival for task in tasks)
        for task in tasks:
            task.arrival = gang  # packed next to each other
            # the task holds the file open: unlinked meanwhile, its pages stay until the end
            task.file.open_count += 1
            if not self._served(task):
                self._catch_up(task.account.uid)
                self._waiting.append(task)
        self._wake.set()

    def _served(self, task: Task) -> bool:
        """Finish a task with nothing to compute (the index had every page)."""
        plan = task.plan
        assert plan is not None
        if plan.compute_ids:
            return False
        self.store.finish_append(self._drop_plan(task, len(task.tokens)))
        gen = task.generate
        self._finish(task, gen.result(task.file.num_tokens) if gen else self._forward_result(task))
        return True

    def _catch_up(self, uid: int) -> None:
        """A uid coming back (or new) starts at the least service of those waiting, as
        CFS does with vruntime: service it had no use for is no credit against them."""
        active = {t.account.uid for t in self._waiting}
        if uid not in active and active:
            floor = min(self.uid_service[u] for u in active)
            self.uid_service[uid] = max(self.uid_service[uid], floor)

    def cancel(self, task: Task) -> None:
        """Stop `task`; its pages go back once no step is using them."""
        if not task.done.is_set():
            task.cancelled = True
            self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        own = self.engine_thread is None
        thread = self.engine_thread = self.engine_thread or EngineThread()
        try:
            # the trio thread's own torch work (a kv_drop's copies) keeps to one core: a
            # team of OpenMP workers of its own would slow every step (engine_thread.py)
            with thread.alone_in_parallel():
                task_status.started()
                await self._loop(thread)
        finally:
            if own:
                thread.close()
                self.engine_thread = None

    async def _loop(self, thread: EngineThread) -> None:
        while True:
            if self._reap_cancelled():
                self._changed_files()
            batch = self._pick()
            if not batch:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            chunks = [chunk for _, chunk in batch]
            tasks = [task for task, _ in batch]
            for task in tasks:
                task.in_flight = True
            t0 = time.perf_counter()
            try:
                outputs = await thread.run(compute_step, self.engine, self.masker, tasks, chunks)
            except Exception:  # a failed step fails its tasks, never the server
                log.exception("engine step failed")
                for task in tasks:
                    task.in_flight = False
                    self._fail(task, StoreError(errno.EIO, "the engine step failed"))
                self._changed_files()
                continue
            step_seconds = time.perf_counter() - t0
            self.busy_seconds += step_seconds
            self.num_steps += 1
            for task, chunk, output in zip(tasks, chunks, outputs, strict=True):
                task.in_flight = False
                self._advance(task, chunk, output)
            self._changed_files()
            returned = sum(1 for t in tasks if t.done.is_set() and (t.samples or t.verify))
            await self._gather_returning(returned, step_seconds)

    def _changed_files(self) -> None:
        """Files changed (appended, given back, reaped): tell the mount, before any
        caller hears of it."""
        if self.after_step is not None:
            self.after_step()

    async def _gather_returning(self, returned: int, step_seconds: float) -> None:
        """Give programs that just got a token back a moment to send their next call.

        A LIP driving each token itself (forward, sample, forward...) answers within
        a socket round trip; packing the next step before those calls arrive would
        split one batch into many. The wait ends as soon as they are all in, and lasts
        at most a tenth of the last step (and MAX_GATHER), so the engine idles little.
        """
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        if not returned:
            return
        target = len(self._waiting) + returned
        with trio.move_on_after(min(MAX_GATHER, 0.1 * step_seconds)):
            while len(self._waiting) < target:
                self._wake = trio.Event()
                await self._wake.wait()

    # packing ------------------------------------------------------------------------

    def _order(self, task: Task) -> tuple[int, int, int, int]:
        """Priority classes first; then users, then programs, with the least attained
        service (tokens computed); then arrival."""
        account = task.account
        return (-account.priority, self.uid_service[account.uid], *task.sort_key()[1:])

    def _pick(self) -> list[tuple[Task, SeqChunk]]:
        """The next step, in fairness order (`_order`): one token for each decode, and
        chunks of prompts. While decodes wait, prompts get at most half the budget, so a
        long prompt slows running generations at most twofold and never stalls them;
        while prompts wait, one seat is theirs."""
        order = sorted(self._waiting, key=self._order)
        budget = self.max_step_tokens
        decoding = any(t.remaining == 1 for t in order)
        prefill_budget = budget // 2 if decoding else budget
        # and a seat is kept for a prompt: decodes alone never fill every seat
        decode_seats = self.max_step_seqs - any(t.remaining > 1 for t in order)
        batch: list[tuple[Task, SeqChunk]] = []
        for task in order:
            if budget == 0 or len(batch) == self.max_step_seqs:
                break
            plan = task.plan
            assert plan is not None
            n = min(task.remaining, budget)
            if task.remaining == 1:
                if decode_seats == 0:
                    continue
                decode_seats -= 1
            else:
                n = min(n, prefill_budget)
                if n == 0:
                    continue  # the rest of the step is the decodes'
                prefill_budget -= n
            batch.append((task, self._chunk(task, plan, n)))
            budget -= n
        return batch

    @staticmethod
    def _chunk(task: Task, plan: AppendPlan, n: int) -> SeqChunk:
        """The next `n` tokens of the task's computation, with the rows it wants."""
        first = task.computed
        rows = [i - first for i in sorted(task.rows) if first <= i < first + n]
        positions = visible = None
        if plan.compute_positions is not None:
            positions = plan.compute_positions[first : first + n]
        if plan.compute_visible is not None:
            visible = plan.compute_visible[first : first + n]
        return SeqChunk(
            plan.compute_ids[first : first + n],
            plan.compute_start + first,
            plan.block_table,
            len(rows),
            positions=positions,
            visible=visible,
            logit_rows=rows,
        )

    # bookkeeping --------------------------------------------------------------------

    def _begin(self, task: Task) -> None:
        account = task.account
        # every prediction the task reads, by new-token index (-1: the file's last token)
        indices = set(task.outputs) | set(task.verify.indices if task.verify else ())
        wanted = [i for i in indices if i >= 0]
        plan = self.store.begin_append(
            task.file,
            task.tokens,
            need_logits=False,
            holder=account.holder,
            positions=task.positions,
            visible=task.visible,
            reuse=task.reuse,
            recompute_last=task.recompute_last,
            logits_from=min(wanted) if wanted else None,
            keep=task.keep,
        )
        quota = account.token_quota
        planned = account.tokens_computed + account.tokens_planned + len(plan.compute_ids)
        try:
            if quota is not None and planned > quota:
                raise StoreError(errno.EDQUOT, f"token quota of {quota} tokens exceeded")
            # after the store's checks (ids, busy): the grammar sees only what could go in
            fed = grammar_steps.check(task, self._token_text)
        except StoreError:
            self.store.abort_append(plan)
            raise
        task.computed = 0
        task.cached = plan.num_reused
        task.rows = {plan.compute_index(at): at for at in indices}  # compute index -> at
        task.plan = plan
        account.tokens_planned += len(plan.compute_ids)
        try:
            grammar_steps.feed(task, fed)
        except StoreError:
            self.store.abort_append(self._drop_plan(task))
            raise

    def _token_text(self, token: int) -> str:
        return repr(self.engine.tokenizer.decode([token]))

    def _drop_plan(self, task: Task, kept: int = 0) -> AppendPlan:
        """Take the task's plan off it, its tokens still to compute no longer planned;
        its grammar keeps the first `kept` of its tokens."""
        plan = task.plan
        assert plan is not None
        task.account.tokens_planned -= task.remaining
        task.plan = None
        grammar_steps.settle(task, kept)
        return plan

    def _advance(self, task: Task, chunk: SeqChunk, output: Any) -> None:
        task.computed += chunk.num_tokens
        task.account.tokens_computed += chunk.num_tokens
        task.account.tokens_planned -= chunk.num_tokens
        self.uid_service[task.account.uid] += chunk.num_tokens
        self.num_tokens += chunk.num_tokens
        if isinstance(output, StoreError):
            task.failure = output
        else:
            task.answers.update(output)
        if task.cancelled or task.remaining:
            return  # more chunks to go, or the reaper's
        if task.failure is not None:  # the file stays as it was before this append
            self._fail(task, task.failure)
            return
        plan = task.plan
        assert plan is not None
        v = task.verify
        num_new = len(task.tokens) if v is None else len(task.tokens) - len(v.draft) + v.accepted
        self.store.finish_append(self._drop_plan(task, num_new), num_new)
        gen = task.generate
        if gen is None:
            self._finish(task, self._forward_result(task))
        elif gen.finish_reason is not None:  # the last generated token is now appended
            self._finish(task, gen.result(task.file.num_tokens))
        else:
            self._next_token(task, task.answers[max(task.outputs)])

    def _forward_result(self, task: Task) -> dict[str, Any]:
        result: dict[str, Any] = {"tokens": task.file.num_tokens, "cached": task.cached}
        v = task.verify
        if v is not None:
            assert v.token is not None
            return {
                **result,
                "accepted": v.accepted,
                "token": v.token,
                "token_ids": [*v.draft[: v.accepted], v.token],
                "ahead": v.after,
            }
        outputs = [{"at": at, **task.answers[at]} for at in sorted(task.answers)]
        result["outputs"] = outputs
        drawn = [o["token"] for o in outputs if "token" in o]
        if drawn:
            result["token"] = drawn[-1]
        return result

    def _next_token(self, task: Task, answer: dict[str, Any]) -> None:
        gen = task.generate
        assert gen is not None
        file = task.file
        room = self.store.max_tokens - max(file.num_tokens, file.next_position)
        if room <= 0:
            gen.finish_reason = "length"  # full: the token cannot go in
            gen.stream_piece()
            self._finish(task, gen.result(file.num_tokens))
            return
        token = answer["token"]
        if gen.num_logprobs is not None:
            top = answer.get("top_k", [])
            gen.logprobs.append({"token": token, "logprob": answer["logprob"], "top": top})
        gen.push(token)
        tokens = [token]
        # what the grammar forces next goes in with it, unsampled (as far as it fits)
        forced = answer.get("forced", [])
        for token in forced[: room - 1]:
            if gen.finish_reason is not None:
                break
            gen.push(token)
            tokens.append(token)
        if answer.get("finished") and len(tokens) == 1 + len(forced) and not gen.finish_reason:
            gen.finish_reason = "stop"  # the grammar is complete
        gen.stream_piece()
        task.tokens = tokens
        task.feed_grammar = True  # what is generated is what a call's grammar constrains
        spec = max(task.outputs.items())[1]
        # the next prediction follows these tokens; after the last, a step appends them
        task.outputs = {} if gen.finish_reason is not None else {len(tokens) - 1: spec}
        try:
            self._begin(task)
        except StoreError as exc:  # out of pages: what was appended so far stands
            gen.finish_reason = "error"  # the last tokens (in the text) are not in the file
            self._finish(task, gen.result(task.file.num_tokens, str(exc)))
            return
        self._served(task)

    def _finish(self, task: Task, result: dict[str, Any]) -> None:
        self._discard(task)
        task.result = result
        task.done.set()

    def _fail(self, task: Task, error: StoreError) -> None:
        if task.plan is not None:
            self.store.abort_append(self._drop_plan(task))
        self._discard(task)
        task.error = error
        task.done.set()

    def _discard(self, task: Task) -> None:
        if task in self._waiting:
            self._waiting.remove(task)
        self.store.close(task.file)
        if task.generate is not None and task.generate.stream is not None:
            task.generate.stream.close()

    def _reap_cancelled(self) -> bool:
        """End the cancelled tasks no step is using; whether there were any. A file keeps
        the whole tokens already computed; a generation answers with what it made."""
        cancelled = [t for t in self._waiting if t.cancelled and not t.in_flight]
        for task in cancelled:
            plan = task.plan
            if plan is not None and plan.keep and task.failure is None and not task.verify:
                kept = plan.whole_new(task.computed)
                self.store.finish_append(self._drop_plan(task, kept), kept)
            gen = task.generate
            if gen is not None:
                gen.finish_reason = gen.finish_reason or "cancelled"
                gen.stream_piece()
                self._finish(task, gen.result(task.file.num_tokens))
            else:
                self._fail(task, StoreError(errno.ECANCELED, "the call was cancelled"))
        return bool(cancelled)
