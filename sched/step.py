"""One engine step's answers: the rows each task reads, sampled under its grammar's mask
(computed meanwhile in a thread of its own), described as its outputs ask, and a verify
task's acceptance. Runs in the engine thread."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from symphony.engine.batch import SeqChunk
from symphony.engine.engine import Engine
from symphony.engine.sampling import GREEDY, finite_rows, sample
from symphony.fs.errors import StoreError
from symphony.sched import constrained as grammar_steps
from symphony.sched.outputs import OutputSpec, describe
from symphony.sched.speculative import accept, guesses_after
from symphony.sched.tasks import Task

_NONE = OutputSpec()


def _refused_all(task: Task) -> StoreError:
    assert task.grammar is not None
    why = task.grammar.problem()
    return StoreError(
        errno.EINVAL,
        "the grammar (with the sampler's allowed and blocked ids) leaves no token here"
        + (f": {why}" if why else ""),
    )


def _not_finite() -> StoreError:
    return StoreError(
        errno.EINVAL, "the logits after this context are not finite: its K/V are out of range"
    )


def compute_step(
    engine: Engine,
    masker: grammar_steps.Masker,
    tasks: Sequence[Task],
    chunks: Sequence[SeqChunk],
) -> list[Any]:
    """In the engine thread: one step, then each task's answers from its rows; the
    grammars' masks are computed meanwhile in a thread of their own.

    A row whose logits are not finite fails its own call, never its neighbours'."""
    rows: list[tuple[int, int, int]] = []  # (task, output index, row of logits)
    for i, (task, chunk) in enumerate(zip(tasks, chunks, strict=True)):
        base = task.computed
        for r in chunk.logit_rows or ():
            rows.append((i, task.rows[base + r], len(rows)))
    sampled = [(i, at, r) for i, at, r in rows if tasks[i].outputs.get(at, _NONE).sample]
    constrained = [  # the rows a grammar constrains: what is sampled or verified
        (i, at, r)
        for i, at, r in rows
        if tasks[i].grammar is not None
        and (tasks[i].verify is not None or tasks[i].outputs.get(at, _NONE).sample)
    ]
    pending_masks = masker.start([(r, tasks[i], at) for i, at, r in constrained])
    try:
        logits = engine.step(chunks)
    finally:  # a failed step fails its tasks, once their grammars are left alone
        masks = pending_masks.result() if pending_masks is not None else {}
    outputs: list[Any] = [{} for _ in tasks]
    ok = finite_rows(logits) if rows else []
    for i, _, r in constrained:
        if r in masks:
            masks[r] = grammar_steps.with_sampler(masks[r], tasks[i].params)
            if not bool(masks[r].any()):
                ok[r] = False
                outputs[i] = _refused_all(tasks[i])
    sampled = [(i, at, r) for i, at, r in sampled if ok[r]]
    if sampled:
        picks = sample(
            logits[[r for _, _, r in sampled]],
            [tasks[i].params or GREEDY for i, _, _ in sampled],
            [tasks[i].generator for i, _, _ in sampled],
            [masks.get(r) for _, _, r in sampled],
        )
        tokens = {r: t for (_, _, r), t in zip(sampled, picks, strict=True)}
    else:
        tokens = {}
    for i, at, r in rows:
        task = tasks[i]
        if isinstance(outputs[i], StoreError):
            continue
        if not ok[r] or (r in tokens and tokens[r] is None):
            outputs[i] = _not_finite()
            continue
        if task.verify is not None:  # a verify task's rows are all its checks
            row = logits[r]
            task.verify.rows[at] = (
                grammar_steps.mask_row(row, masks[r]) if r in masks else row.clone()
            )
        spec = task.outputs.get(at)
        if spec is not None:
            outputs[i][at] = answer = describe(logits[r], spec, tokens.get(r))
            if task.generate is not None and task.grammar is not None and r in tokens:
                token = tokens[r]
                assert token is not None
                # forced tokens get no row of their own: not when logprobs are asked
                fast = task.generate.num_logprobs is None
                forced, finished = grammar_steps.after_sample(task.grammar, token, fast)
                answer["forced"], answer["finished"] = forced, finished
    for i, (task, chunk) in enumerate(zip(tasks, chunks, strict=True)):
        v = task.verify
        done = task.computed + chunk.num_tokens == len(task.plan.compute_ids) if task.plan else True
        failed = task.failure is not None or isinstance(outputs[i], StoreError)
        if v is not None and done and not failed and set(v.indices) <= set(v.rows):
            rows = [v.rows[at] for at in v.indices]
            params = task.params or GREEDY
            v.accepted, v.token = accept(rows, v.draft, params, task.generator, v.draft_probs)
            if v.ahead and v.accepted < len(v.draft):  # as far as the grammar's masks go
                masked = len(v.draft) if v.grammar_takes is None else v.grammar_takes
                v.after = guesses_after(rows[: masked + 1], v.accepted, params)
    return outputs
