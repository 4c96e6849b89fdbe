"""Paged attention in Triton: decode and prefill chunks of a step in one kernel launch.

The kernel reads K/V straight from the pages through each sequence's block table (no
gathered copy), with the LIP interface's attention: causal by slot, or per query token
the explicit visible ranges (`SeqChunk.visible`), given here as rows of a dense mask.
Explicit positions need nothing here: they move only the rotary embedding, applied
before the K/V were stored.

One program computes BLOCK_M query rows of one sequence against one KV head, the rows
being (token, query head of the KV head's group) pairs: a decode token's whole group is
one block, so grouped-query heads read each page once. Keys go a page (at most 64 slots
of one) at a time with an online softmax. It runs on CUDA, and on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set before this module is imported), which is
how CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from symphony.engine.batch import AttnMetadata
from symphony.engine.sdpa_attention import visible_mask

BLOCK_M = 16  # query rows a program
MIN_PAGE_SIZE = 16  # keys go in blocks of min(page, 64): tl.dot wants 16 or more
MAX_KEY_BLOCK = 64  # a bigger page (flash-attn's 256) is read in blocks of this


@triton.jit
def _paged_attention(
    q_ptr,  # [tokens, heads, head_dim]
    k_ptr,  # [pages, page_size, kv_heads, head_dim]
    v_ptr,
    out_ptr,  # like q
    tables_ptr,  # [seqs, max_pages] int32
    starts_ptr,  # [seqs + 1] int32: cu_seqlens_q
    context_ptr,  # [seqs] int32
    mask_ptr,  # [mask_rows, mask_width] int8, 1 = attend (unused without HAS_MASK)
    mask_row_ptr,  # [tokens] int32: the token's mask row, -1 for causal
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_table,
    stride_mask,
    scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys a block: PAGE, or a part of it
    BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 (tf32 would stray from SDPA), else "tf32"
):
    seq = tl.program_id(0)
    block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(starts_ptr + seq)
    q_len = tl.load(starts_ptr + seq + 1) - q_start
    context = tl.load(context_ptr + seq)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # (token, group member) pairs
    if block * BLOCK_M < q_len * GROUP:
        token = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = rows < q_len * GROUP
        own_slot = context - q_len + token  # causal: a query sees slots 0..own_slot
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q_offsets = (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        mask_row = tl.full([BLOCK_M], -1, tl.int32)
        if HAS_MASK:
            mask_row = tl.load(mask_row_ptr + q_start + token, mask=row_ok, other=-1)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # causal blocks stop at their last query's slot; masked ones may see any slot
        end = tl.minimum(context, context - q_len + (block * BLOCK_M + BLOCK_M - 1) // GROUP + 1)
        if HAS_MASK:
            end = context
        for first in range(0, end, BLOCK_N):
            page = tl.load(tables_ptr + seq * stride_table + first // PAGE).to(tl.int64)
            slot = first % PAGE + tl.arange(0, BLOCK_N)
            keys = first + tl.arange(0, BLOCK_N)
            key_ok = keys < context
            kv_offsets = (
                page * stride_kp + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
            )
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            seen = (keys[None, :] <= own_slot[:, None]) & key_ok[None, :]
            if HAS_MASK:
                ranged = mask_row >= 0
                marks = tl.load(
                    mask_ptr + mask_row[:, None] * stride_mask + keys[None, :],
                    mask=ranged[:, None] & key_ok[None, :],
                    other=0,
                )
                seen = tl.where(ranged[:, None], (marks != 0) & key_ok[None, :], seen)
            scores = tl.where(seen, scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            # a row that has seen no key yet keeps -inf: shift by 0 so exp gives 0, not NaN
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(top - shift)
            total = total * rescale + tl.sum(p, 1)
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            acc = acc * rescale[:, None] + pv.to(tl.float32)
            top = new_top
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        out_offsets = (
            (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        )
        tl.store(
            out_ptr + out_offsets,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@dataclass
class TritonPlan:
    """One step's tables for every layer's launch."""

    tables: torch.Tensor  # [seqs, max_pages] int32
    starts: torch.Tensor  # [seqs + 1] int32
    context_lens: torch.Tensor  # [seqs] int32
    max_query_len: int
    mask: torch.Tensor | None  # [mask_rows, max_context] int8, None: all causal
    mask_rows: torch.Tensor | None  # [tokens] int32


class TritonAttention:
    """The Triton kernel as an attention backend (CUDA, or CPU under the interpreter)."""

    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> None:
        if page_size < MIN_PAGE_SIZE:
            raise ValueError(f"the triton backend needs pages of at least {MIN_PAGE_SIZE} tokens")
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size

    def prepare(self, meta: AttnMetadata) -> TritonPlan:
        device = meta.slot_mapping.device
        mask = mask_rows = None
        if meta.masked:
            width = meta.max_context_len
            blocks, rows = [], torch.full((sum(meta.query_lens),), -1, dtype=torch.int32)
            used = 0
            for i, ranges in enumerate(meta.visible):
                if ranges is None:
                    continue
                n, ctx = meta.query_lens[i], meta.context_lens[i]
                block = torch.zeros(n, width, dtype=torch.int8)
                block[:, :ctx] = visible_mask(ranges, ctx - n, ctx)
                blocks.append(block)
                start = meta.query_starts[i]
                rows[start : start + n] = torch.arange(used, used + n, dtype=torch.int32)
                used += n
            mask = torch.cat(blocks).to(device)
            mask_rows = rows.to(device)
        return TritonPlan(
            tables=meta.block_table.to(torch.int32),
            starts=meta.cu_seqlens_q.to(torch.int32),
            context_lens=meta.context_lens_t.to(torch.int32),
            max_query_len=meta.max_query_len,
            mask=mask,
            mask_rows=mask_rows,
        )

    def graph_plan(
        self,
        tables: torch.Tensor,
        starts: torch.Tensor,
        context_lens: torch.Tensor,
        cu_keys: torch.Tensor,
        max_context: int,
    ) -> TritonPlan:
        """A decode plan over buffers a CUDA graph reads (engine/cuda_graphs.py)."""
        return TritonPlan(tables, starts, context_lens, 1, mask=None, mask_rows=None)

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TritonPlan
    ) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        seqs = plan.context_lens.shape[0]
        grid = (seqs, triton.cdiv(plan.max_query_len * self.group, BLOCK_M), self.num_kv_heads)
        has_mask = plan.mask is not None
        mask = plan.mask if plan.mask is not None else plan.starts  # any tensor: unread
        mask_rows = plan.mask_rows if plan.mask_rows is not None else plan.starts
        _paged_attention[grid](
            q,
            k_cache,
            v_cache,
            out,
            plan.tables,
            plan.starts,
            plan.context_lens,
            mask,
            mask_rows,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            plan.tables.stride(0),
            mask.stride(0) if has_mask else 0,
            self.head_dim**-0.5,
            GROUP=self.group,
            HEAD_DIM=self.head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)),
            PAGE=self.page_size,
            BLOCK_N=min(self.page_size, MAX_KEY_BLOCK),
            BLOCK_M=BLOCK_M,
            HAS_MASK=has_mask,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
        return out
