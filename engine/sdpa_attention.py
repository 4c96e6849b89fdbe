"""Paged attention with torch's scaled_dot_product_attention, and on a CPU the compiled
kernels: the backend that always runs.

A step's sequences go three ways:
- with the compiled CPU kernels (engine/cpu_kernels.cpp), every sequence of unmasked
  query tokens (decodes, a verify's draft, a Jacobi window, a prefill) in one
  `paged_attention` call that reads K/V in place; the rows that share their first pages
  (a chunk's, forks of one prefix) read those keys and values together, once for every
  4 rows, and each row's result is bitwise what it is alone. So a prompt computed whole,
  in chunks, or after a prefix-cache hit gets the same attention, bit for bit (and the
  same logits, where the linears' kernels too compute a row as alone: int8);
- without the kernels, decode tokens that mostly share their pages (forks of one
  prefix) in one SDPA call over each distinct page once;
- the rest (chunks with explicit visible ranges; without kernels every chunk and every
  other decode too) by SDPA over K/V gathered from the pages, with a boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from symphony.engine.batch import AttnMetadata


def visible_mask(ranges: list[list[int] | None], start_pos: int, context_len: int) -> torch.Tensor:
    """[n, context_len] bool, True where query j (at slot start_pos + j) sees a key.

    `ranges[j]` is None (causal) or a checked flat list of half-open slot ranges. Built
    on the host from +1/-1 marks at each range's ends and one cumulative sum, so the cost
    is per range, not per key.
    """
    rows: list[int] = []
    bounds: list[int] = []
    for j, own in enumerate(ranges):
        seen = [0, start_pos + j + 1] if own is None else own
        rows += [j] * (len(seen) // 2)
        bounds += seen
    rows_t = torch.tensor(rows, dtype=torch.long)
    bounds_t = torch.tensor(bounds, dtype=torch.long).view(-1, 2)
    marks = torch.zeros(len(ranges), context_len + 1, dtype=torch.int8)
    one = torch.ones(len(rows), dtype=torch.int8)
    marks.index_put_((rows_t, bounds_t[:, 0]), one, accumulate=True)
    marks.index_put_((rows_t, bounds_t[:, 1]), -one, accumulate=True)
    return marks.cumsum(1, dtype=torch.int8)[:, :context_len] > 0


@dataclass
class _PrefillPlan:
    start: int
    length: int
    pages: torch.Tensor  # [num_pages] long
    context_len: int
    mask: torch.Tensor  # [group * length, context_len] bool, True = attend


@dataclass
class _KernelPlan:
    """The rows the CPU kernel takes: sequence s's are rows[starts[s]:starts[s + 1]]."""

    rows: torch.Tensor | None  # [T] flat token rows; None: all of the step's, in order
    tables: torch.Tensor  # [S, max_pages] long
    starts: torch.Tensor  # [S + 1] long
    lens: torch.Tensor  # [T] long: the slots each row sees (causal within its chunk)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tables, starts, lens: `paged_attention`'s arguments after q and the caches."""
        return self.tables, self.starts, self.lens


@dataclass
class _DecodePlan:
    """Decode tokens through SDPA: gathered per sequence, or over their shared pages."""

    rows: torch.Tensor  # [B] flat token rows of the decode sequences
    pages: torch.Tensor  # [B * max_pages] long, padded with own last page
    mask: torch.Tensor | None  # [B, 1, 1, L] bool; None when B == 1 (no padding)
    length: int  # L: keys per decode sequence after the gather
    # when the sequences share most pages (forks of one prefix): each distinct page
    # once, and a mask [B * group, U * page_size] of which keys each query row sees
    shared_pages: torch.Tensor | None = None  # [U]
    shared_mask: torch.Tensor | None = None


@dataclass
class SdpaPlan:
    kernel: _KernelPlan | None = None
    decode: _DecodePlan | None = None
    prefills: list[_PrefillPlan] = field(default_factory=list)


class SdpaAttention:
    """torch SDPA over gathered pages, and the CPU kernels where they run."""

    name = "sdpa"

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        kernels: ModuleType | None = None,
    ) -> None:
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        # the compiled CPU kernels read the pages in place (fp32 on a CPU, head_dim a
        # multiple of 8); None: SDPA over gathered pages
        self._kernels = kernels if head_dim % 8 == 0 else None

    def prepare(self, meta: AttnMetadata) -> SdpaPlan:
        plan = SdpaPlan()
        device = meta.slot_mapping.device
        decodes = list(meta.decode_seq_ids)
        if len(decodes) > 1 and self._kernels is None:  # forks: shared pages once, by SDPA
            plan.decode = self._plan_shared(meta, decodes, device)
            if plan.decode is not None:
                decodes = []
        kernel_ids: set[int] = set()
        if self._kernels is not None:  # decodes and unmasked chunks, in place
            # (every chunk: on the 2-core Zen 4, whole int8 steps, a 512-token prefill
            # took 764 ms against SDPA's 918, 2,048 tokens 5.6 s against 12.6, 33 tokens
            # after 2,000 136 ms against 160; and chunks then give the bits of the whole)
            kernel_ids = set(decodes) | {i for i in meta.prefill_seq_ids if meta.visible[i] is None}
            decodes = []
        if kernel_ids:
            plan.kernel = self._plan_kernel(meta, sorted(kernel_ids), device)
        if decodes:
            plan.decode = self._plan_gathered(meta, decodes, device)
        plan.prefills = [
            self._plan_prefill(meta, i, device) for i in meta.prefill_seq_ids if i not in kernel_ids
        ]
        return plan

    def _plan_kernel(self, meta: AttnMetadata, ids: list[int], device: torch.device) -> _KernelPlan:
        rows: list[int] = []
        lens: list[int] = []
        starts = [0]
        for i in ids:
            n, ctx = meta.query_lens[i], meta.context_lens[i]
            rows += range(meta.query_starts[i], meta.query_starts[i] + n)
            lens += range(ctx - n + 1, ctx + 1)  # token j sees the slots up to its own
            starts.append(len(rows))
        width = max(-(-meta.context_lens[i] // self.page_size) for i in ids)
        tables = [meta.block_tables[i][:width] for i in ids]
        tables = [t + [0] * (width - len(t)) for t in tables]  # past a row's length: unread
        # the rows go by sequence, each's in order: all of the step's means in order
        in_order = len(rows) == int(meta.slot_mapping.shape[0])

        def long(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return _KernelPlan(None if in_order else long(rows), long(tables), long(starts), long(lens))

    def _plan_gathered(
        self, meta: AttnMetadata, ids: list[int], device: torch.device
    ) -> _DecodePlan:
        lens = [meta.context_lens[i] for i in ids]
        max_pages = -(-max(lens) // self.page_size)
        pages = []
        for i in ids:
            # padded with the sequence's own last page, never another's: a masked key
            # still poisons the softmax if it holds a NaN
            table = meta.block_tables[i][:max_pages]
            pages += table + [table[-1]] * (max_pages - len(table))
        plan = _DecodePlan(
            rows=torch.tensor([meta.query_starts[i] for i in ids], device=device),
            pages=torch.tensor(pages, dtype=torch.long, device=device),
            mask=None,
            length=lens[0] if len(ids) == 1 else max_pages * self.page_size,
        )
        if len(ids) > 1:  # one sequence gathers exactly its keys: no mask
            span = torch.arange(plan.length, device=device)
            lens_t = torch.tensor(lens, device=device)
            plan.mask = (span[None, :] < lens_t[:, None])[:, None, None, :]
        return plan

    def _plan_shared(
        self, meta: AttnMetadata, ids: list[int], device: torch.device
    ) -> _DecodePlan | None:
        """The shared-pages plan, when the union of pages is at most half the gather."""
        ps = self.page_size
        tables = [meta.block_tables[i] for i in ids]
        lens = [meta.context_lens[i] for i in ids]
        max_pages = -(-max(lens) // ps)
        position: dict[int, int] = {}
        for table, n in zip(tables, lens, strict=True):
            for page in table[: -(-n // ps)]:
                position.setdefault(page, len(position))
        if 2 * len(position) > len(tables) * max_pages:
            return None
        # valid[b, u]: how many slots of distinct page u sequence b sees
        valid = torch.zeros(len(tables), len(position), dtype=torch.long)
        for b, (table, n) in enumerate(zip(tables, lens, strict=True)):
            for j, page in enumerate(table[: -(-n // ps)]):
                valid[b, position[page]] = min(ps, n - j * ps)
        seen = torch.arange(ps)[None, None, :] < valid[:, :, None]  # [B, U, page_size]
        rows = seen.view(len(tables), 1, -1).expand(-1, self.group, -1)
        return _DecodePlan(
            rows=torch.tensor([meta.query_starts[i] for i in ids], device=device),
            pages=torch.empty(0, dtype=torch.long, device=device),
            mask=None,
            length=0,
            shared_pages=torch.tensor(list(position), dtype=torch.long, device=device),
            shared_mask=rows.reshape(len(tables) * self.group, -1).to(device),
        )

    def _plan_prefill(self, meta: AttnMetadata, i: int, device: torch.device) -> _PrefillPlan:
        n, ctx = meta.query_lens[i], meta.context_lens[i]
        ranges = meta.visible[i]
        if ranges is None:
            # query j sits at slot ctx - n + j and sees keys 0..ctx - n + j
            q_pos = torch.arange(ctx - n, ctx, device=device)
            mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
        else:
            mask = visible_mask(ranges, ctx - n, ctx).to(device)
        return _PrefillPlan(
            start=meta.query_starts[i],
            length=n,
            pages=torch.tensor(meta.block_tables[i][: -(-ctx // self.page_size)], device=device),
            context_len=ctx,
            mask=mask.repeat(self.group, 1),
        )

    def whole_step_kernel(self, plan: SdpaPlan) -> _KernelPlan | None:
        """The kernel's plan where the kernel takes every row of the step in order."""
        k = plan.kernel
        return k if k is not None and k.rows is None else None

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: SdpaPlan
    ) -> torch.Tensor:
        whole = self.whole_step_kernel(plan)
        if whole is not None:  # the kernel takes every row, in order
            return self._kernel(q, k_cache, v_cache, whole)
        k = plan.kernel
        d = plan.decode
        if d is not None and not plan.prefills and k is None and d.rows.numel() == q.shape[0]:
            return self._decode(q, k_cache, v_cache, d)  # every row a decode, in order
        out = torch.empty_like(q)
        if k is not None:
            out[k.rows] = self._kernel(q[k.rows], k_cache, v_cache, k)
        if d is not None:
            out[d.rows] = self._decode(q[d.rows], k_cache, v_cache, d)
        for p in plan.prefills:
            out[p.start : p.start + p.length] = self._prefill(q, k_cache, v_cache, p)
        return out

    def _kernel(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _KernelPlan
    ) -> torch.Tensor:
        assert self._kernels is not None
        return self._kernels.paged_attention(
            q, k_cache, v_cache, plan.tables, plan.starts, plan.lens, self.head_dim**-0.5
        )

    def _prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: _PrefillPlan
    ) -> torch.Tensor:
        kvh, group, d = self.num_kv_heads, self.group, self.head_dim
        k = k_cache.index_select(0, p.pages).flatten(0, 1)[: p.context_len].transpose(0, 1)
        v = v_cache.index_select(0, p.pages).flatten(0, 1)[: p.context_len].transpose(0, 1)
        k, v = k.to(q.dtype), v.to(q.dtype)  # bf16 pages under an fp32 model
        # [n, kvh*group, d] -> [kvh, group * n, d]
        qp = q[p.start : p.start + p.length].view(p.length, kvh, group, d)
        qp = qp.permute(1, 2, 0, 3).reshape(kvh, group * p.length, d)
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask)
        return o.view(kvh, group, p.length, d).permute(2, 0, 1, 3).reshape(p.length, -1, d)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _DecodePlan
    ) -> torch.Tensor:
        """One query token per sequence. q [B, num_heads, head_dim] -> same shape."""
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        if plan.shared_pages is not None:  # every query against each distinct page once
            k = k_cache.index_select(0, plan.shared_pages).view(-1, kvh, d).transpose(0, 1)
            v = v_cache.index_select(0, plan.shared_pages).view(-1, kvh, d).transpose(0, 1)
            k, v = k.to(q.dtype), v.to(q.dtype)
            # [B, kvh, group, d] -> [kvh, B * group, d]: one query matrix per KV head
            qs = q.view(b, kvh, self.group, d).transpose(0, 1).reshape(kvh, b * self.group, d)
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=plan.shared_mask)
            return o.view(kvh, b, self.group, d).transpose(0, 1).reshape(b, kvh * self.group, d)
        # [B * max_pages, page_size, kvh, d] -> [B, kvh, L, d]
        k = k_cache.index_select(0, plan.pages).view(b, -1, kvh, d)[:, : plan.length]
        v = v_cache.index_select(0, plan.pages).view(b, -1, kvh, d)[:, : plan.length]
        k, v = k.to(q.dtype), v.to(q.dtype)
        # the group of query heads sharing a KV head acts as that head's query rows
        qd = q.view(b, kvh, self.group, d)
        o = F.scaled_dot_product_attention(
            qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask
        )
        return o.reshape(b, kvh * self.group, d)
