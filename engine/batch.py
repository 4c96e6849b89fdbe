"""What one engine step computes: chunks of many sequences, flattened for the forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SeqChunk:
    """One sequence's share of a step: new tokens at slots start_pos.. of its context.

    `block_table` lists the pages holding slots 0..start_pos+len(token_ids)-1, in order;
    the engine writes new token j's K/V into slot start_pos + j. The optional fields
    default to plain causal decoding; each, when given, has one entry per new token:

    - `positions`: the rotary position of each token (default start_pos + j). Only the
      rotary embedding uses it: where the K/V goes and what causal means stay by slot.
      Each must lie in 0..max_position-1 (checked by `Engine.step`).
    - `visible`: per token, None (causal: slots 0..start_pos+j) or a flat list
      [s0, e0, s1, e1, ...] of sorted, disjoint, non-empty half-open slot ranges the
      token attends to; the last must end at its own slot + 1 (it sees itself).
    - `logit_rows`: indices 0..n-1 of the tokens whose logits the step returns, in the
      order given (repeats allowed). When given it replaces `num_logits`, which is then
      ignored; otherwise the last `num_logits` tokens' logits are returned (1 to sample
      the next token, 0 for none).
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    num_logits: int = 1
    positions: Sequence[int] | None = None
    visible: Sequence[Sequence[int] | None] | None = None
    logit_rows: Sequence[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def returned_rows(self) -> list[int]:
        """Indices of the tokens whose logits the step returns, in the order returned."""
        if self.logit_rows is not None:
            return list(self.logit_rows)
        n = self.num_tokens
        return list(range(n - self.num_logits, n))

    @property
    def masked(self) -> bool:
        """Whether some token has explicit visible ranges (not plain causal)."""
        return self.visible is not None and any(r is not None for r in self.visible)


@dataclass
class AttnMetadata:
    """Where each sequence's queries and keys are, for the attention backends."""

    # per sequence (host lists, for the per-sequence SDPA path)
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    # device tensors
    slot_mapping: torch.Tensor  # [num_tokens] flat slot (page * page_size + offset) per token
    block_table: torch.Tensor  # [num_seqs, max_pages] padded with page 0
    context_lens_t: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    # per sequence: None (causal) or, per query token, None (causal) or its flat list of
    # visible slot ranges [s0, e0, s1, e1, ...], checked by build_step_input
    visible: list[list[list[int] | None] | None]
    # one unmasked query token: the batched decode path; every other sequence (masked
    # ones even with one token) goes through the per-sequence path
    decode_seq_ids: list[int] = field(default_factory=list)
    prefill_seq_ids: list[int] = field(default_factory=list)

    @property
    def masked(self) -> bool:
        """Whether some sequence has explicit visible ranges."""
        return any(v is not None for v in self.visible)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)


@dataclass
class StepInput:
    """A batch flattened to tokens: ids, positions, attention metadata, logit rows."""

    token_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttnMetadata
    logits_indices: torch.Tensor  # [num_logits] rows of the flat batch whose logits are wanted


def build_step_input(chunks: Sequence[SeqChunk], page_size: int, device: str) -> StepInput:
    """Flatten `chunks` into one step, checking each chunk is well formed.

    Raises:
        ValueError: a chunk is empty; its block table is too short for its context; its
            num_logits or a logit row is out of range; its positions or visible lists
            are not one per token; or a visible list is malformed (see `SeqChunk`).
    """
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    query_starts, query_lens, context_lens, tables = [], [], [], []
    visible: list[list[list[int] | None] | None] = []
    for chunk in chunks:
        n = chunk.num_tokens
        if n == 0:
            raise ValueError("a chunk has no tokens")
        table = checked_table(chunk, page_size)
        start = len(token_ids)
        query_starts.append(start)
        query_lens.append(n)
        context_lens.append(chunk.context_len)
        tables.append(table)
        token_ids.extend(chunk.token_ids)
        for pos in range(chunk.start_pos, chunk.context_len):
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        if chunk.positions is None:
            positions.extend(range(chunk.start_pos, chunk.context_len))
        else:
            if len(chunk.positions) != n:
                raise ValueError(f"{len(chunk.positions)} positions for {n} tokens")
            positions.extend(chunk.positions)
        visible.append(_checked_visible(chunk))
        logits_rows.extend(start + row for row in _checked_rows(chunk))

    max_pages = max(len(t) for t in tables)
    padded = [t + [0] * (max_pages - len(t)) for t in tables]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)
    is_decode = [n == 1 and v is None for n, v in zip(query_lens, visible, strict=True)]

    def tensor(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    attn = AttnMetadata(
        query_starts=query_starts,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=tables,
        slot_mapping=tensor(slots),
        block_table=torch.tensor(padded, dtype=torch.int32, device=device),
        context_lens_t=tensor(context_lens, torch.int32),
        cu_seqlens_q=tensor(cu, torch.int32),
        visible=visible,
        decode_seq_ids=[i for i, d in enumerate(is_decode) if d],
        prefill_seq_ids=[i for i, d in enumerate(is_decode) if not d],
    )
    return StepInput(
        token_ids=tensor(token_ids),
        positions=tensor(positions),
        attn=attn,
        logits_indices=tensor(logits_rows),
    )


def checked_table(chunk: SeqChunk, page_size: int) -> list[int]:
    """The chunk's block table, refused if too short for its context."""
    table = list(chunk.block_table)
    if len(table) * page_size < chunk.context_len:
        raise ValueError(
            f"block table of {len(table)} pages cannot hold {chunk.context_len} tokens"
        )
    return table


def _checked_rows(chunk: SeqChunk) -> list[int]:
    """The chunk's logit rows, each in 0..n-1."""
    n = chunk.num_tokens
    if chunk.logit_rows is None:
        if not 0 <= chunk.num_logits <= n:
            raise ValueError(f"num_logits {chunk.num_logits} outside 0..{n}")
        return chunk.returned_rows
    rows = list(chunk.logit_rows)
    bad = [r for r in rows if not 0 <= r < n]
    if bad:
        raise ValueError(f"logit rows {bad} outside 0..{n - 1}")
    return rows


def _checked_visible(chunk: SeqChunk) -> list[list[int] | None] | None:
    """The chunk's visible ranges, one entry per token, each well formed; None when no
    token has any (plain causal, the fast paths).

    A malformed list is refused rather than clipped: attention over the wrong keys
    would give plausible but wrong logits, with nothing to show for it.
    """
    if chunk.visible is None:
        return None
    n = chunk.num_tokens
    if len(chunk.visible) != n:
        raise ValueError(f"{len(chunk.visible)} visible lists for {n} tokens")
    if not chunk.masked:
        return None
    out: list[list[int] | None] = []
    for j, ranges in enumerate(chunk.visible):
        if ranges is None:
            out.append(None)
            continue
        slot = chunk.start_pos + j
        bounds = list(ranges)
        problem = ranges_problem(bounds, slot)
        if problem is not None:
            shown = f"{bounds[:8]}{'...' if len(bounds) > 8 else ''}"
            raise ValueError(f"token {j} at slot {slot}: visible {shown} {problem}")
        out.append(bounds)
    return out


def ranges_problem(bounds: Sequence[int], own: int) -> str | None:
    """What is wrong with `bounds` as the visible ranges of the token at index `own`
    (None: nothing): a flat list [s0, e0, s1, e1, ...] of sorted, disjoint, non-empty
    half-open ranges within 0..own + 1, the last ending with the token itself."""
    if not bounds or len(bounds) % 2:
        return "must be a flat list [start, end, ...]"
    end = 0  # each range starts at or after the previous one's end
    for s, e in zip(bounds[::2], bounds[1::2], strict=True):
        if not end <= s < e <= own + 1:
            return f"ranges must be sorted, disjoint, non-empty and within 0..{own + 1}"
        end = e
    if end != own + 1:
        return f"must include the token itself (index {own})"
    return None
