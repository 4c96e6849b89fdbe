"""What one engine step computes: chunks of many sequences, flattened for the forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SeqChunk:
    """One sequence's share of a step: new tokens at positions start_pos.. of its context.

    `block_table` lists the pages holding positions 0..start_pos+len(token_ids)-1, in
    order; the engine writes the new tokens' K/V into them. `num_logits` asks for the
    logits of that many trailing tokens (1 to sample the next token, 0 for none).
    """

    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    num_logits: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


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
    decode_seq_ids: list[int] = field(default_factory=list)  # sequences with one query token
    prefill_seq_ids: list[int] = field(default_factory=list)

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
    """Flatten `chunks` into one step, checking each block table covers its context.

    Raises:
        ValueError: a chunk is empty, asks for more logits than tokens, or its block
            table is too short for its context.
    """
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    query_starts, query_lens, context_lens, tables = [], [], [], []
    for chunk in chunks:
        n = chunk.num_tokens
        if n == 0:
            raise ValueError("a chunk has no tokens")
        if not 0 <= chunk.num_logits <= n:
            raise ValueError(f"num_logits {chunk.num_logits} outside 0..{n}")
        table = list(chunk.block_table)
        if len(table) * page_size < chunk.context_len:
            raise ValueError(
                f"block table of {len(table)} pages cannot hold {chunk.context_len} tokens"
            )
        start = len(token_ids)
        query_starts.append(start)
        query_lens.append(n)
        context_lens.append(chunk.context_len)
        tables.append(table)
        token_ids.extend(chunk.token_ids)
        for pos in range(chunk.start_pos, chunk.context_len):
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        logits_rows.extend(range(start + n - chunk.num_logits, start + n))

    max_pages = max(len(t) for t in tables)
    padded = [t + [0] * (max_pages - len(t)) for t in tables]
    cu = [0]
    for n in query_lens:
        cu.append(cu[-1] + n)

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
        decode_seq_ids=[i for i, n in enumerate(query_lens) if n == 1],
        prefill_seq_ids=[i for i, n in enumerate(query_lens) if n > 1],
    )
    return StepInput(
        token_ids=tensor(token_ids),
        positions=tensor(positions),
        attn=attn,
        logits_indices=tensor(logits_rows),
    )
