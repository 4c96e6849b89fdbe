"""Paged attention behind one interface, with two backends.

- `SdpaAttention`: torch scaled_dot_product_attention over K/V gathered from the pages
  (CPU and any GPU). Decode sequences go in one padded call; prefill chunks, and chunks
  with explicit visible ranges, one by one with a boolean mask.
- `FlashAttention`: flash-attn's varlen kernel reading K/V straight from the pages
  through the block table (CUDA with flash_attn installed); causal only, so a step with
  visible ranges goes through SDPA over the same pages.
- `TritonAttention` (engine/triton_attention.py): a Triton kernel over the block tables
  with visible ranges too; CUDA, or the CPU under Triton's interpreter (the tests).

`choose_attention` picks one and its page size.

Each reads K/V from the page pool, which the model has already written for this step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from symphony.engine.batch import AttnMetadata

log = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttnMetadata) -> Any:
        """Work shared by every layer of one step (index tensors, masks)."""

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Any
    ) -> torch.Tensor:
        """Attention of q [num_tokens, num_heads, head_dim] over the cached K/V."""


@dataclass
class _PrefillPlan:
    start: int
    length: int
    pages: torch.Tensor  # [num_pages] long
    context_len: int
    mask: torch.Tensor  # [group * length, context_len] bool, True = attend


@dataclass
class _SdpaPlan:
    decode_rows: torch.Tensor | None  # [B] flat token rows of the decode sequences
    decode_pages: torch.Tensor | None  # [B * max_pages] long, padded with own last page
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool; None when B == 1 (no padding)
    decode_len: int  # L: keys per decode sequence after the gather
    decode_lens: torch.Tensor | None  # [B] long: each decode sequence's context length
    all_decode: bool  # every token of the step is a decode token, in order
    prefills: list[_PrefillPlan]
    # when decode sequences share most pages (forks of one prefix): each distinct page
    # once, and a mask [B * group, U * page_size] of which keys each query row sees
    shared_pages: torch.Tensor | None = None  # [U]
    shared_mask: torch.Tensor | None = None


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


class SdpaAttention:
    """torch SDPA over gathered pages: the always-available backend."""

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
        # the compiled CPU kernels' decode attention reads the pages in place (fp32 on
        # a CPU, head_dim a multiple of 8); None: SDPA over gathered pages
        self._kernels = kernels if head_dim % 8 == 0 else None

    def prepare(self, meta: AttnMetadata) -> _SdpaPlan:
        device = meta.slot_mapping.device
        ids = meta.decode_seq_ids
        plan = _SdpaPlan(
            None, None, None, 0, None, len(ids) == len(meta.query_lens), [], None, None
        )
        if ids:
            lens = [meta.context_lens[i] for i in ids]
            max_pages = -(-max(lens) // self.page_size)
            pages = []
            for i in ids:
                # padded with the sequence's own last page, never another's: a masked
                # key still poisons the softmax if it holds a NaN
                table = meta.block_tables[i][:max_pages]
                pages += table + [table[-1]] * (max_pages - len(table))
            plan.decode_len = max_pages * self.page_size
            plan.decode_rows = torch.tensor([meta.query_starts[i] for i in ids], device=device)
            plan.decode_pages = torch.tensor(pages, dtype=torch.long, device=device)
            plan.decode_lens = torch.tensor(lens, dtype=torch.long, device=device)
            if len(ids) > 1:
                self._plan_shared(plan, [meta.block_tables[i] for i in ids], lens, max_pages)
            if len(ids) == 1:
                plan.decode_len = lens[0]  # one sequence: gather exactly its keys, no mask
            else:
                span = torch.arange(plan.decode_len, device=device)
                lens_t = torch.tensor(lens, device=device)
                plan.decode_mask = (span[None, :] < lens_t[:, None])[:, None, None, :]
        for i in meta.prefill_seq_ids:
            n, ctx = meta.query_lens[i], meta.context_lens[i]
            num_pages = -(-ctx // self.page_size)
            ranges = meta.visible[i]
            if ranges is None:
                # query j sits at slot ctx - n + j and sees keys 0..ctx - n + j
                q_pos = torch.arange(ctx - n, ctx, device=device)
                mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
            else:
                mask = visible_mask(ranges, ctx - n, ctx).to(device)
            plan.prefills.append(
                _PrefillPlan(
                    start=meta.query_starts[i],
                    length=n,
                    pages=torch.tensor(meta.block_tables[i][:num_pages], device=device),
                    context_len=ctx,
                    mask=mask.repeat(self.group, 1),
                )
            )
        return plan

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _SdpaPlan
    ) -> torch.Tensor:
        kvh, group, d = self.num_kv_heads, self.group, self.head_dim
        if plan.all_decode:
            assert plan.decode_pages is not None
            return self._decode(q, k_cache, v_cache, plan)
        out = torch.empty_like(q)
        if plan.decode_rows is not None:
            out[plan.decode_rows] = self._decode(q[plan.decode_rows], k_cache, v_cache, plan)
        for p in plan.prefills:
            k = k_cache.index_select(0, p.pages).flatten(0, 1)[: p.context_len].transpose(0, 1)
            v = v_cache.index_select(0, p.pages).flatten(0, 1)[: p.context_len].transpose(0, 1)
            # [n, kvh*group, d] -> [kvh, group * n, d]
            qp = q[p.start : p.start + p.length].view(p.length, kvh, group, d)
            qp = qp.permute(1, 2, 0, 3).reshape(kvh, group * p.length, d)
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask)
            o = o.view(kvh, group, p.length, d).permute(2, 0, 1, 3).reshape(p.length, -1, d)
            out[p.start : p.start + p.length] = o
        return out

    def _plan_shared(
        self, plan: _SdpaPlan, tables: list[list[int]], lens: list[int], max_pages: int
    ) -> None:
        """Use the shared-pages path when the union of pages is at most half the gather."""
        ps = self.page_size
        position: dict[int, int] = {}
        for table, n in zip(tables, lens, strict=True):
            for page in table[: -(-n // ps)]:
                position.setdefault(page, len(position))
        if 2 * len(position) > len(tables) * max_pages:
            return
        # valid[b, u]: how many slots of distinct page u sequence b sees
        valid = torch.zeros(len(tables), len(position), dtype=torch.long)
        for b, (table, n) in enumerate(zip(tables, lens, strict=True)):
            for j, page in enumerate(table[: -(-n // ps)]):
                valid[b, position[page]] = min(ps, n - j * ps)
        seen = torch.arange(ps)[None, None, :] < valid[:, :, None]  # [B, U, page_size]
        rows = seen.view(len(tables), 1, -1).expand(-1, self.group, -1)
        device = plan.decode_rows.device if plan.decode_rows is not None else "cpu"
        plan.shared_mask = rows.reshape(len(tables) * self.group, -1).to(device)
        plan.shared_pages = torch.tensor(list(position), dtype=torch.long, device=device)

    def _decode_shared(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _SdpaPlan
    ) -> torch.Tensor:
        """Every decode query against each distinct page once: [B, heads, d] -> same."""
        assert plan.shared_pages is not None
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        k = k_cache.index_select(0, plan.shared_pages).view(-1, kvh, d).transpose(0, 1)
        v = v_cache.index_select(0, plan.shared_pages).view(-1, kvh, d).transpose(0, 1)
        # [B, kvh, group, d] -> [kvh, B * group, d]: one query matrix per KV head
        qs = q.view(b, kvh, self.group, d).transpose(0, 1).reshape(kvh, b * self.group, d)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=plan.shared_mask)
        return o.view(kvh, b, self.group, d).transpose(0, 1).reshape(b, kvh * self.group, d)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _SdpaPlan
    ) -> torch.Tensor:
        """One query token per sequence. q [B, num_heads, head_dim] -> same shape."""
        if plan.shared_pages is not None:
            return self._decode_shared(q, k_cache, v_cache, plan)
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        pages = plan.decode_pages
        assert pages is not None and plan.decode_lens is not None
        if self._kernels is not None:  # straight from the pages, no gathered copy
            table = pages.view(b, -1)
            return self._kernels.paged_decode_attention(
                q, k_cache, v_cache, table, plan.decode_lens, d**-0.5
            )
        # [B * max_pages, page_size, kvh, d] -> [B, kvh, L, d]
        k = k_cache.index_select(0, pages).view(b, -1, kvh, d)[:, : plan.decode_len]
        v = v_cache.index_select(0, pages).view(b, -1, kvh, d)[:, : plan.decode_len]
        # the group of query heads sharing a KV head acts as that head's query rows
        qd = q.view(b, kvh, self.group, d)
        o = F.scaled_dot_product_attention(
            qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.decode_mask
        )
        return o.reshape(b, kvh * self.group, d)


def flash_attn_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttention:
    """flash-attn's varlen kernel over paged K/V (CUDA only).

    flash-attn's paged KV wants pages of a multiple of 256 tokens; `choose_attention`
    refuses this backend for other page sizes. The kernel is causal only: a step in
    which any chunk has visible ranges is planned and run by an `SdpaAttention` over
    the same pages instead (same [num_pages, page_size, kv_heads, head_dim] layout);
    steps without them keep the flash kernel.
    """

    name = "flash"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func
        self._masked = SdpaAttention(num_heads, num_kv_heads, head_dim, page_size)

    def prepare(self, meta: AttnMetadata) -> dict[str, Any] | _SdpaPlan:
        if meta.masked:
            return self._masked.prepare(meta)
        cu_k = torch.zeros(len(meta.context_lens) + 1, dtype=torch.int32)
        cu_k[1:] = torch.tensor(meta.context_lens).cumsum(0)
        return {
            "cu_seqlens_q": meta.cu_seqlens_q,
            "cu_seqlens_k": cu_k.to(meta.cu_seqlens_q.device),
            "max_seqlen_q": meta.max_query_len,
            "max_seqlen_k": meta.max_context_len,
            "block_table": meta.block_table,
        }

    def graph_plan(
        self,
        tables: torch.Tensor,
        starts: torch.Tensor,
        context_lens: torch.Tensor,
        cu_keys: torch.Tensor,
        max_context: int,
    ) -> dict[str, Any]:
        """A decode plan over buffers a CUDA graph reads (engine/cuda_graphs.py): the
        key bound fixed at the largest context."""
        return {
            "cu_seqlens_q": starts,
            "cu_seqlens_k": cu_keys,
            "max_seqlen_q": 1,
            "max_seqlen_k": max_context,
            "block_table": tables,
        }

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: dict[str, Any] | _SdpaPlan,
    ) -> torch.Tensor:
        if isinstance(plan, _SdpaPlan):
            return self._masked(q, k_cache, v_cache, plan)
        return self._varlen(q, k_cache, v_cache, causal=True, **plan)


FLASH_PAGE_SIZE = 256  # flash-attn's paged KV wants a multiple of 256 tokens a page
PAGE_SIZE = 16  # every other backend's


def _flash_problem(device: str, page_size: int) -> str | None:
    if not device.startswith("cuda"):
        return "needs CUDA"
    if not flash_attn_available():
        return "needs the flash_attn package"
    if page_size and page_size % FLASH_PAGE_SIZE:
        return f"needs a page size that is a multiple of {FLASH_PAGE_SIZE}, not {page_size}"
    return None


def _triton_problem(device: str, page_size: int) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the triton package (pip install '.[gpu]')"
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return "runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1)"
    from symphony.engine.triton_attention import MIN_PAGE_SIZE

    if page_size and page_size < MIN_PAGE_SIZE:
        return f"needs pages of at least {MIN_PAGE_SIZE} tokens, not {page_size}"
    return None


def choose_attention(choice: str, device: str, page_size: int = 0) -> tuple[str, int]:
    """The backend ("flash", "triton" or "sdpa") and page size a `choice` runs with.

    `page_size` 0 takes the backend's own (256 for flash, else 16). "auto" on CUDA takes
    flash, else triton, else SDPA over gathered pages, and logs one line saying why it
    fell back; on a CPU it is SDPA (with the compiled kernels' decode). A backend asked
    for by name that cannot run raises ValueError saying why.
    """
    if choice in ("flash", "triton"):
        problem = (_flash_problem if choice == "flash" else _triton_problem)(device, page_size)
        if problem is not None:
            raise ValueError(f"the {choice} attention backend {problem}")
        return choice, page_size or (FLASH_PAGE_SIZE if choice == "flash" else PAGE_SIZE)
    if choice == "sdpa" or not device.startswith("cuda"):
        return "sdpa", page_size or PAGE_SIZE
    flash = _flash_problem(device, page_size)
    if flash is None:
        return "flash", page_size or FLASH_PAGE_SIZE
    triton = _triton_problem(device, page_size)
    if triton is None:
        log.warning("attention: triton (flash %s)", flash)
        return "triton", page_size or PAGE_SIZE
    log.warning("attention: sdpa over gathered pages (flash %s; triton %s)", flash, triton)
    return "sdpa", page_size or PAGE_SIZE


def make_attention(
    name: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    kernels: ModuleType | None = None,
) -> AttentionBackend:
    """The backend `name` chosen by `choose_attention`, for pages of `page_size`.

    `kernels`: the compiled CPU kernels, for SDPA's decode on a CPU in fp32.
    """
    if name == "flash":
        return FlashAttention(num_heads, num_kv_heads, head_dim, page_size)
    if name == "triton":  # imported only here: triton.jit reads TRITON_INTERPRET then
        from symphony.engine.triton_attention import TritonAttention

        return TritonAttention(num_heads, num_kv_heads, head_dim, page_size)
    return SdpaAttention(num_heads, num_kv_heads, head_dim, page_size, kernels)
