"""The batch loop: appends and generations of many programs, packed into engine steps.

Each step takes decode tokens and prefill chunks up to a token budget, programs with
the least attained service first within priority classes (program-level fairness, as
in Autellix's PLAS). The engine runs in one worker thread behind a CapacityLimiter(1);
the next step starts as soon as the last one returns and work waits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import trio

from symphony.engine.batch import SeqChunk
from symphony.engine.engine import Engine
from symphony.engine.sampling import GREEDY, finite_rows, sample, top_logprobs
from symphony.fs.errors import StoreError
from symphony.fs.store import KVStore
from symphony.sched.tasks import Task

log = logging.getLogger(__name__)

MAX_GATHER = 0.02  # seconds the loop may wait for returning per-token programs


def _not_finite() -> StoreError:
    return StoreError(
        errno.EINVAL, "the logits after this context are not finite: its K/V are out of range"
    )


class Scheduler:
    """Owns the engine thread; tasks go in with `submit` and come out through `task.done`."""

    def __init__(
        self, engine: Engine, store: KVStore, max_step_tokens: int = 512, max_step_seqs: int = 256
    ) -> None:
        if max_step_tokens < 1 or max_step_seqs < 1:
            raise ValueError("a step must take at least one token of one sequence")
        self.engine = engine
        self.store = store
        self.max_step_tokens = max_step_tokens
        self.max_step_seqs = max_step_seqs
        self.limiter = trio.CapacityLimiter(1)  # the engine thread: one step at a time
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
        self._begin(task)
        # the task holds the file open: unlinked meanwhile, its pages stay until the end
        task.file.open_count += 1
        if task.plan is None:  # nothing to compute: everything came from the index
            self._finish(task, {"tokens": task.file.num_tokens})
            return
        self._catch_up(task.account.uid)
        self._waiting.append(task)
        self._wake.set()

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
        task_status.started()
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
                outputs = await trio.to_thread.run_sync(
                    self._compute, tasks, chunks, limiter=self.limiter
                )
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
            returned = sum(1 for t in tasks if t.done.is_set() and t.want == "sample")
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
            ids = plan.compute_ids[task.computed : task.computed + n]
            last = task.computed + n == len(plan.compute_ids)
            num_logits = 1 if last and task.want != "none" else 0
            start = plan.compute_start + task.computed
            batch.append((task, SeqChunk(ids, start, plan.block_table, num_logits)))
            budget -= n
        return batch

    def _compute(self, tasks: Sequence[Task], chunks: Sequence[SeqChunk]) -> list[Any]:
        """In the engine thread: one step, then sampling for the rows that want it."""
        logits = self.engine.step(chunks)
        outputs: list[Any] = [None] * len(tasks)
        rows = [i for i, c in enumerate(chunks) if c.num_logits]
        # a row whose logits are not finite fails its own call, never its neighbours':
        # sample() says so for its rows (None), and the logprob rows are checked here
        sampled = [i for i in rows if tasks[i].want == "sample"]
        if sampled:
            picks = [rows.index(i) for i in sampled]
            tokens = sample(
                logits[picks],
                [tasks[i].params or GREEDY for i in sampled],
                [tasks[i].generator for i in sampled],
            )
            for i, token in zip(sampled, tokens, strict=True):
                outputs[i] = _not_finite() if token is None else {"token": token}
        for row, i in enumerate(rows):
            if not tasks[i].num_logprobs or isinstance(outputs[i], StoreError):
                continue
            if outputs[i] is None and not finite_rows(logits[row : row + 1])[0]:
                outputs[i] = _not_finite()  # not sampled, so not checked yet
                continue
            outputs[i] = {
                **(outputs[i] or {}),
                "logprobs": top_logprobs(logits[row], tasks[i].num_logprobs),
            }
        return outputs

    # bookkeeping --------------------------------------------------------------------

    def _begin(self, task: Task) -> None:
        account = task.account
        if task.recompute:  # generate: the logits after the file's last token, once
            task.recompute = False
            plan = self.store.begin_recompute(task.file, account.holder)
        else:
            plan = self.store.begin_append(
                task.file, task.tokens, task.want != "none", account.holder
            )
        quota = account.token_quota
        if quota is not None and account.tokens_computed + len(plan.compute_ids) > quota:
            self.store.abort_append(plan)
            raise StoreError(errno.EDQUOT, f"token quota of {quota} tokens exceeded")
        task.computed = 0
        if not plan.compute_ids:
            self.store.finish_append(plan)
            task.plan = None
            return
        task.plan = plan

    def _advance(self, task: Task, chunk: SeqChunk, output: Any) -> None:
        task.computed += chunk.num_tokens
        task.account.tokens_computed += chunk.num_tokens
        self.uid_service[task.account.uid] += chunk.num_tokens
        self.num_tokens += chunk.num_tokens
        if task.cancelled or task.remaining:
            return  # more chunks to go, or the reaper's
        if isinstance(output, StoreError):  # the file stays as it was before this append
            self._fail(task, output)
            return
        assert task.plan is not None
        self.store.finish_append(task.plan)
        task.plan = None
        gen = task.generate
        if gen is None:
            self._finish(task, {"tokens": task.file.num_tokens, **(output or {})})
        elif gen.finish_reason is not None:  # the last generated token is now appended
            self._finish(task, self._generate_result(task))
        else:
            self._next_token(task, output["token"])

    def _next_token(self, task: Task, token: int) -> None:
        gen = task.generate
        assert gen is not None
        if task.file.num_tokens >= self.store.max_tokens:  # full: the token cannot go in
            gen.finish_reason = "length"
            self._stream_text(task)
            self._finish(task, self._generate_result(task))
            return
        gen.token_ids.append(token)
        if token in gen.stop_token_ids:  # appended to the file, but not part of the text
            gen.finish_reason = "stop"
        else:
            # a stop string can only end in the new piece: look at the tail alone
            tail = max(0, len(gen.text) - gen.longest_stop + 1)
            gen.text += gen.decoder.push(token)
            found = [i for s in gen.stop_strings if (i := gen.text.find(s, tail)) >= 0]
            if found:
                cut = min(found)
                gen.text, gen.finish_reason = gen.text[:cut], "stop"
            elif len(gen.token_ids) >= gen.max_tokens:
                gen.finish_reason = "length"
        self._stream_text(task)
        task.tokens = [token]
        if gen.finish_reason is not None:
            task.want = "none"  # one more step appends the last token, no logits
        try:
            self._begin(task)
        except StoreError as exc:  # out of pages: what was appended so far stands
            gen.finish_reason = "error"  # the last token (in the text) is not in the file
            self._finish(task, {**self._generate_result(task), "error": str(exc)})
            return
        if task.plan is None:
            self._finish(task, self._generate_result(task))

    def _stream_text(self, task: Task) -> None:
        gen = task.generate
        assert gen is not None
        # hold back what could still become a stop string
        hold = 0 if gen.finish_reason else max((len(s) - 1 for s in gen.stop_strings), default=0)
        end = max(gen.emitted, len(gen.text) - hold)
        if end > gen.emitted and gen.stream is not None:
            # a reader that stopped listening still gets the final result
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                gen.stream.send_nowait(gen.text[gen.emitted : end])
            gen.emitted = end

    def _generate_result(self, task: Task) -> dict[str, Any]:
        gen = task.generate
        assert gen is not None
        return {
            "text": gen.text,
            "token_ids": gen.token_ids,
            "finish_reason": gen.finish_reason,
            "tokens": task.file.num_tokens,
        }

    def _finish(self, task: Task, result: dict[str, Any]) -> None:
        self._discard(task)
        task.result = result
        task.done.set()

    def _fail(self, task: Task, error: StoreError) -> None:
        if task.plan is not None:
            self.store.abort_append(task.plan)
            task.plan = None
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
        """Fail the cancelled tasks no step is using; whether there were any."""
        cancelled = [t for t in self._waiting if t.cancelled and not t.in_flight]
        for task in cancelled:
            self._fail(task, StoreError(errno.ECANCELED, "the call was cancelled"))
        return bool(cancelled)
