"""A task's grammar in the batch loop: fed at begin, settled at the end, masks per step.

The grammar in effect is the file's (its matcher follows the file) or the call's own
(it starts after the call's tokens and ends with the call). While an append is in
flight the grammar has been fed its tokens (`task.fed` of them): the mask after the last
one is then its state as it stands, so the engine thread computes the next masks in a
worker thread during the step, and a refused append never begins.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from symphony.engine.sampling import SamplingParams
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar
from symphony.sched.tasks import Task

log = logging.getLogger(__name__)

# (row of the step's logits, the task, the new-token index it predicts after)
Row = tuple[int, Task, int]


def tokens_fed(task: Task) -> list[int]:
    """What this append feeds the grammar: the task's tokens (a verify's pending ones,
    not its draft), unless they are the prompt of a call's own grammar."""
    if task.grammar is None or not task.feed_grammar:
        return []
    v = task.verify
    return task.tokens if v is None else task.tokens[: len(task.tokens) - len(v.draft)]


def check(task: Task, describe_token: Callable[[int], str]) -> list[int]:
    """The tokens to feed once the append begins, checked.

    Raises:
        StoreError: EINVAL naming the first token the grammar refuses.
    """
    tokens = tokens_fed(task)
    assert task.grammar is not None or not tokens
    bad = task.grammar.refused(tokens) if task.grammar is not None else None
    if bad is not None:
        raise StoreError(
            errno.EINVAL,
            f"tokens[{bad}] (token {tokens[bad]}, {describe_token(tokens[bad])}) "
            "is refused by the grammar",
        )
    return tokens


def feed(task: Task, tokens: Sequence[int]) -> None:
    if tokens:
        assert task.grammar is not None
        task.grammar.feed(tokens)
        task.fed = len(tokens)


def settle(task: Task, num_new: int) -> None:
    """The append kept its first `num_new` tokens: the grammar holds exactly those (a
    cancelled append kept fewer; a verify keeps its accepted draft too). A grammar
    that cannot (llguidance failed) is taken off the file, never left out of step."""
    grammar = task.grammar
    try:
        if grammar is not None and task.feed_grammar:
            if num_new < task.fed:
                grammar.unfeed(task.fed - num_new)
            elif num_new > task.fed:
                grammar.feed(task.tokens[task.fed : num_new])
    except StoreError as exc:
        log.error("a grammar lost its place and is dropped: %s", exc.args[0])
        if task.file.grammar is grammar:
            task.file.grammar = None
    task.fed = 0


def _steps_back(task: Task, at: int) -> int:
    """How many fed tokens lie after new token `at` (-1: the file's last)."""
    return task.fed - (at + 1) if task.fed else 0


def _row_mask(task: Task, at: int) -> torch.Tensor:
    grammar = task.grammar
    assert grammar is not None
    back = _steps_back(task, at)
    if not back:
        return grammar.allowed()
    # a copy goes back: the grammar itself never stands behind what its file holds (a
    # fork meanwhile copies it from there)
    earlier = grammar.copy()
    earlier.unfeed(back)
    return earlier.allowed()


def _verify_masks(task: Task) -> dict[int, torch.Tensor]:
    """Masks of a verify's rows by new-token index, as far as the grammar takes its draft
    (acceptance stops at the first refused token, so the rows after it are never read)."""
    grammar, v = task.grammar, task.verify
    assert grammar is not None and v is not None
    takes = grammar.refused(v.draft)
    takes = len(v.draft) if takes is None else takes
    v.grammar_takes = takes  # the rows after it have no mask: `ahead` stops there
    masks = {}
    fed = 0
    try:
        for j in range(takes + 1):
            masks[v.first + j] = grammar.allowed()
            if j < takes:
                grammar.feed([v.draft[j]])
                fed += 1
    finally:
        grammar.unfeed(fed)
    return masks


def compute_masks(rows: Sequence[Row]) -> dict[int, torch.Tensor]:
    """The allowed tokens of each row (sampled or verified), by row."""
    out: dict[int, torch.Tensor] = {}
    verified: dict[int, dict[int, torch.Tensor]] = {}
    for r, task, at in rows:
        if task.verify is not None:
            key = id(task)
            if key not in verified:
                verified[key] = _verify_masks(task)
            if at in verified[key]:
                out[r] = verified[key][at]
        else:
            out[r] = _row_mask(task, at)
    return out


class Masker:
    """Computes a step's masks in a thread of its own while the engine runs the step
    (llguidance computes without the GIL)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")

    def start(self, rows: Sequence[Row]) -> Future[dict[int, torch.Tensor]] | None:
        return self._pool.submit(compute_masks, list(rows)) if rows else None


def mask_row(row: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A copy of `row` with the tokens the grammar refuses at -inf."""
    return row.float().masked_fill(~allowed.to(row.device), float("-inf"))


def with_sampler(allowed: torch.Tensor, params: SamplingParams | None) -> torch.Tensor:
    """The grammar's mask less what the sampler's own lists rule out: empty when the two
    leave nothing (that task fails alone, not by an argmax over -inf)."""
    if params is None or (params.allowed_token_ids is None and not params.blocked_token_ids):
        return allowed
    allowed = allowed.clone()
    if params.allowed_token_ids is not None:
        only = torch.zeros_like(allowed)
        only[sorted(params.allowed_token_ids)] = True
        allowed &= only
    if params.blocked_token_ids:
        allowed[sorted(params.blocked_token_ids)] = False
    return allowed


def after_sample(grammar: Grammar, token: int, fast_forward: bool) -> tuple[list[int], bool]:
    """For a generation: the tokens the grammar forces after `token` (with
    `fast_forward`), and whether it is finished after them. The grammar stands as before."""
    try:
        grammar.feed([token])
    except StoreError:  # drawn under the grammar's own mask: llguidance disagrees
        log.warning("the grammar refused a token drawn under its own mask")
        return [], False
    forced: list[int] = []
    try:
        if fast_forward:
            forced = grammar.forced()
            grammar.feed(forced)
        return forced, grammar.finished
    except StoreError:
        forced = []
        return [], False
    finally:
        grammar.unfeed(1 + len(forced))
