"""Appends to KV files in two halves: plan (pages found, copied, allocated), then commit.

`begin_append` finds leading pages in the prefix index, copies a shared partial page and
allocates the rest, and returns the plan whose `compute_ids` the engine must compute;
`finish_append` commits it (or only its first tokens, for a cancelled one) and
`abort_append` gives everything back. A plan may also compute the file's last token again
(its logits are wanted and the store keeps none), and a plan that does not `keep` is a
scratch computation: it holds every page it reads, writes only pages of its own, leaves
the file free for others meanwhile, and commits nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from symphony.engine.batch import SeqChunk
from symphony.fs.charges import Holder
from symphony.fs.errors import StoreError
from symphony.fs.nodes import COMPUTED, KVFile
from symphony.fs.prefix_index import ROOT_HASH, page_hash

if TYPE_CHECKING:
    from symphony.fs.store import KVStore


@dataclass
class AppendPlan:
    """An append in flight: what to compute, and the page references it holds.

    What to compute is fixed when the plan is made (`seal`): a scratch plan's file may
    change meanwhile, and nothing here reads it again.
    """

    file: KVFile
    token_ids: list[int]  # every new token
    positions: list[int]  # the RoPE position of each new token
    start_pos: int  # the file's length when the plan was made
    num_reused: int  # leading new tokens whose pages came from the prefix index
    block_table: list[int]  # pages of the whole context after the append
    visible: list[list[int] | None] | None = None  # each new token's attention ranges
    owned: list[int] = field(default_factory=list)  # references to drop on abort
    replaced: int | None = None  # the shared partial page that was copied
    recompute_last: bool = False  # computes the file's last token again first
    custom: bool = False  # a position or mask other than the default: never indexed
    keep: bool = True  # False: a scratch computation, committed never
    # what the engine computes, from `seal`
    compute_ids: list[int] = field(default_factory=list)
    compute_positions: list[int] | None = None  # None: the default ones
    compute_visible: list[list[int] | None] | None = None  # None: causal

    def seal(self) -> None:
        """Fix what the engine computes: the new tokens the index did not supply, after
        the file's last token (with its position and mask) when it is computed again."""
        file, n = self.file, self.num_reused
        self.compute_ids = self.token_ids[n:]
        positioned = self.custom or file.positions is not None
        self.compute_positions = self.positions[n:] if positioned else None
        self.compute_visible = None if self.visible is None else self.visible[n:]
        if self.recompute_last:
            last = self.start_pos - 1
            self.compute_ids = [file.token_ids[last], *self.compute_ids]
            if self.compute_positions is not None:
                at = last if file.positions is None else file.positions[last]
                self.compute_positions = [at, *self.compute_positions]
            mask = file.masks.get(last)
            if mask is not None or self.compute_visible is not None:
                self.compute_visible = [
                    mask,
                    *(self.compute_visible or [None] * len(self.token_ids)),
                ]

    @property
    def compute_start(self) -> int:
        return self.start_pos - 1 if self.recompute_last else self.start_pos + self.num_reused

    def compute_index(self, at: int) -> int:
        """Where the prediction after new token `at` (-1: the file's last) lies among
        `compute_ids`."""
        return at + 1 if self.recompute_last else at - self.num_reused

    def whole_new(self, computed: int) -> int:
        """New tokens whose K/V are all computed after `computed` of `compute_ids`."""
        return max(0, self.num_reused + computed - (1 if self.recompute_last else 0))

    def chunk(self, num_logits: int = 1) -> SeqChunk:
        """The whole computation as one engine chunk."""
        return SeqChunk(
            self.compute_ids,
            self.compute_start,
            self.block_table,
            num_logits,
            positions=self.compute_positions,
            visible=self.compute_visible,
        )


class Appends:
    """The append half of KVStore (its pages, index and plans)."""

    def begin_append(
        self: KVStore,
        file: KVFile,
        token_ids: Sequence[int],
        need_logits: bool = True,
        holder: Holder | None = None,
        *,
        positions: Sequence[int] | None = None,
        visible: Sequence[list[int] | None] | None = None,
        recompute_last: bool = False,
        logits_from: int | None = None,
        keep: bool = True,
        reuse: bool = True,
    ) -> AppendPlan:
        """Prepare appending `token_ids` to `file`; the caller computes the plan.

        `positions` (default: after the file's last) are the new tokens' RoPE positions;
        `visible`, per new token, the ranges it attends to (None: causal). Either makes
        the append custom: nothing comes from the prefix index and its pages never enter
        it. `reuse=False` takes nothing from the index either (a caller who is not the
        file's owner must not learn what the owner's cache domain holds). With
        `need_logits` the last new token is computed (its logits are wanted), and with
        `logits_from` every new token from that index on; the prefix index never supplies
        their pages. `recompute_last` also computes the file's last token again (the
        logits after it). `keep=False` plans a scratch computation (see the module).
        New pages are charged to `holder`.

        Raises:
            StoreError: EINVAL for bad tokens, EBUSY if an append is in flight, ENOSPC.
        """
        ids = self._check_tokens(file, token_ids, allow_empty=recompute_last)
        if recompute_last and not file.num_tokens:
            raise StoreError(errno.EINVAL, "the file has no token to continue from")
        if file.busy and keep:
            raise StoreError(errno.EBUSY, "an append to this file is in flight")
        start = file.num_tokens
        default = list(range(file.next_position, file.next_position + len(ids)))
        new_positions = default if positions is None else list(positions)
        if new_positions and max(new_positions) >= self.max_tokens:
            raise StoreError(
                errno.EINVAL,
                f"position {max(new_positions)} is past the model's context of {self.max_tokens}",
            )
        masked = visible is not None and any(v is not None for v in visible)
        custom = masked or new_positions != default
        plan = AppendPlan(
            file,
            ids,
            new_positions,
            start,
            0,
            list(file.pages),
            visible=list(visible) if masked and visible is not None else None,
            recompute_last=recompute_last,
            custom=custom,
            keep=keep,
        )
        if not keep:  # the plan reads the pages as they are now, whatever the file does
            self.pool.incref(plan.block_table)
            plan.owned += plan.block_table
        try:
            if reuse and not (custom or recompute_last or file.custom_from is not None):
                limit = len(ids) - (1 if need_logits else 0)
                if logits_from is not None:
                    limit = min(limit, logits_from)
                self._reuse_indexed_pages(plan, limit)
            filled = start % self.page_size
            if recompute_last:
                self._own_last_page(plan, (start - 1) % self.page_size, holder, keep)
            elif filled and not plan.num_reused:
                self._own_last_page(plan, filled, holder, keep)
            missing = -(-(start + len(ids)) // self.page_size) - len(plan.block_table)
            if missing > 0:
                new = self.allocate(missing, holder)
                plan.owned += new
                plan.block_table += new
        except BaseException:
            self.pool.decref(plan.owned)
            raise
        plan.seal()
        if keep:
            file.busy = True
        self._plans.append(plan)
        return plan

    def _check_tokens(
        self: KVStore, file: KVFile, token_ids: Sequence[int], allow_empty: bool = False
    ) -> list[int]:
        ids = list(token_ids)
        if not ids and not allow_empty:
            raise StoreError(errno.EINVAL, "no tokens to append")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise StoreError(errno.EINVAL, f"token id {bad!r} outside 0..{self.vocab_size - 1}")
        if file.num_tokens + len(ids) > self.max_tokens:
            raise StoreError(
                errno.EINVAL,
                f"{file.num_tokens} + {len(ids)} tokens exceed the context of {self.max_tokens}",
            )
        return ids

    def _reuse_indexed_pages(self: KVStore, plan: AppendPlan, limit: int) -> None:
        """Take leading whole pages of the new tokens (at most `limit` tokens) from the
        index."""
        file, ps = plan.file, self.page_size
        if self.index is None or plan.start_pos % ps:
            return
        parent = file.page_hashes[-1] if file.page_hashes else ROOT_HASH
        while plan.num_reused + ps <= limit:
            page_ids = plan.token_ids[plan.num_reused : plan.num_reused + ps]
            key = page_hash(parent, page_ids, self.fingerprint, file.domain)
            page = self.index.lookup(key, parent, page_ids)
            if page is None:
                break
            self.pool.incref([page])
            plan.owned.append(page)
            plan.block_table.append(page)
            plan.num_reused += ps
            parent = key

    def _own_last_page(
        self: KVStore, plan: AppendPlan, filled: int, holder: Holder | None, alone_ok: bool
    ) -> None:
        """Make the plan's last page one it may write into: that page itself if the file
        alone holds it (and `alone_ok`), else a copy of its first `filled` slots."""
        last = plan.block_table[-1]
        if alone_ok and self.pool.refcounts[last] == 1:
            return  # this file's alone: write in place
        (copy,) = self.allocate(1, holder)
        plan.owned.append(copy)
        self.pool.copy_page(last, copy, filled)
        plan.block_table[-1] = copy
        plan.replaced = last

    def finish_append(self: KVStore, plan: AppendPlan, num_new: int | None = None) -> None:
        """Commit a computed append: the file now holds the new tokens and pages (only
        the first `num_new` new tokens, if given: a cancelled plan's computed ones, or a
        verification's accepted ones). A scratch plan commits nothing."""
        if not plan.keep:
            self.abort_append(plan)
            return
        file = plan.file
        num_new = len(plan.token_ids) if num_new is None else min(num_new, len(plan.token_ids))
        self._plans.remove(plan)
        file.busy = False
        keep_pages = -(-(plan.start_pos + num_new) // self.page_size)
        # the file keeps its references to its old pages and takes over the plan's;
        # the one to a partial page it copied goes, and so do pages left unused
        self.pool.decref(plan.block_table[keep_pages:])
        file.pages = plan.block_table[:keep_pages]
        if plan.replaced is not None:
            self.pool.decref([plan.replaced])
        if num_new:
            if plan.custom and file.custom_from is None:
                file.custom_from = plan.start_pos
            if file.positions is None and plan.custom:
                file.positions = file.position_list()
            if file.positions is not None:  # extended, not rebuilt: O(new tokens)
                file.positions.extend(plan.positions[:num_new])
            for j, ranges in enumerate((plan.visible or [])[:num_new]):
                if ranges is not None:
                    file.masks[plan.start_pos + j] = ranges
            file.token_ids.extend(plan.token_ids[:num_new])
            file.cached_tokens += min(plan.num_reused, num_new)
        self._hash_full_pages(file)
        file.touch()
        self._maybe_reap(file)

    def abort_append(self: KVStore, plan: AppendPlan) -> None:
        """Give back every page reference the plan took; the file is as before."""
        self._plans.remove(plan)
        if plan.keep:
            plan.file.busy = False
        self.pool.decref(plan.owned)
        self._maybe_reap(plan.file)

    def _hash_full_pages(self: KVStore, file: KVFile, index: bool = True) -> None:
        """Extend the file's hash chain over its full pages, listing them in the index if
        every K/V of the file was computed here (nothing derived from imported bytes) at
        default positions under the causal mask."""
        index = index and file.origin == COMPUTED
        ps = self.page_size
        plain_pages = file.num_tokens // ps if file.custom_from is None else file.custom_from // ps
        for i in range(len(file.page_hashes), file.num_tokens // ps):
            parent = file.page_hashes[-1] if file.page_hashes else ROOT_HASH
            page_ids = file.token_ids[i * ps : (i + 1) * ps]
            key = page_hash(parent, page_ids, self.fingerprint, file.domain)
            file.page_hashes.append(key)
            if index and i < plain_pages and self.index is not None:
                self.index.insert(key, parent, page_ids, file.pages[i])
