"""CUDA graphs for the decode step (`--cuda-graphs`): one launch where there were hundreds.

At batch 1 a decode step of a small model is a few hundred small kernel launches, each
costing more host time than its GPU time. A CUDA graph records them once for a fixed
shape and replays them with one call. Shapes are made fixed here: a step of b decode
tokens runs the graph of the smallest bucket >= b, its rows past b padded with a dummy
sequence whose one token lives in a scratch page of its own (no real page is touched).
Inputs go through static buffers the graph reads: token ids, positions, slots, block
tables (every row as wide as the model's whole context) and context lengths.

Only a backend whose decode reads the block tables on the device can be recorded: the
triton or flash backends, whose `graph_plan` makes their plan over the static buffers;
SDPA gathers pages into tensors sized by the step. Every
bucket is recorded when the engine starts, before the server runs.

`capture` does the recording: `capture_cuda` on a GPU; tests on a CPU pass
`EagerReplay`, which replays by running the function again over the same buffers, so
everything but the recording itself (buffers, padding, plans) is tested without one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from symphony.engine.batch import SeqChunk, checked_table

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Replayable(Protocol):
    def replay(self) -> None: ...


def capture_cuda(fn: Callable[[], None], memory: Any) -> Replayable:
    """A CUDA graph of `fn`, after two warm-up runs on a side stream (Triton compiles
    and the allocator settles outside the recording); `memory`: the graphs' shared pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA calls (a FUSE read) do not void the recording
    with torch.cuda.graph(graph, pool=memory, capture_error_mode="thread_local"):
        fn()
    return graph


class EagerReplay:
    """The stand-in for a graph on a CPU: replaying runs `fn` again."""

    def __init__(self, fn: Callable[[], None], memory: Any = None) -> None:
        self._fn = fn
        fn()

    def replay(self) -> None:
        self._fn()


def is_plain_decode(chunk: SeqChunk) -> bool:
    """One token, causal, its logits returned: what a graph computes. Anything else
    (a malformed chunk too) goes the eager way, which checks it."""
    rows = [0] if chunk.logit_rows is None and chunk.num_logits == 1 else chunk.logit_rows
    one_each = all(v is None or len(v) == 1 for v in (chunk.positions, chunk.visible))
    return chunk.num_tokens == 1 and one_each and not chunk.masked and list(rows or []) == [0]


class _Bucket:
    """The static buffers and the recorded graph of one batch size."""

    def __init__(self, size: int, max_pages: int, device: str) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.size = size
        self.token_ids = zeros(size)
        self.positions = zeros(size)
        self.slots = zeros(size)
        self.rows = torch.arange(size, device=device)  # every row's logits
        self.tables = zeros(size, max_pages, dtype=torch.int32)
        self.context_lens = zeros(size, dtype=torch.int32)
        self.starts = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.cu_keys = zeros(size + 1, dtype=torch.int32)
        self.logits: torch.Tensor | None = None
        self.graph: Replayable | None = None


class DecodeGraphs:
    """Runs plain decode steps of up to max(BUCKETS) sequences as replayed graphs."""

    def __init__(
        self,
        model: Any,
        pool: Any,
        attention: Any,
        max_context: int,
        capture: Callable[[Callable[[], None], Any], Replayable] = capture_cuda,
        buckets: Sequence[int] = BUCKETS,
    ) -> None:
        if not hasattr(attention, "graph_plan"):  # SDPA's gathers are sized by the step
            raise ValueError(
                f"cuda graphs need the triton or flash attention backend, not {attention.name}"
            )
        self._model, self._pool, self._attention = model, pool, attention
        self._device = str(pool.k_cache[0].device)
        self._page_size = pool.page_size
        self._max_pages = -(-max_context // self._page_size)
        self._capture = capture
        self._memory = torch.cuda.graph_pool_handle() if capture is capture_cuda else None
        # the padding rows' one token goes here: a page no file or sequence ever holds
        self._scratch = pool.reserve()
        # every bucket recorded now, before the server runs: a recording later would
        # stall serving for a compile and a device-wide synchronize
        self._buckets = {size: self._record(size) for size in sorted(buckets)}
        self._largest = max(self._buckets)

    def fits(self, chunks: Sequence[SeqChunk]) -> bool:
        return 0 < len(chunks) <= self._largest and all(is_plain_decode(c) for c in chunks)

    def run(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] (fp32) of a step that `fits`."""
        b = len(chunks)
        bucket = self._buckets[next(size for size in self._buckets if size >= b)]
        self._fill(bucket, chunks)
        assert bucket.graph is not None and bucket.logits is not None
        bucket.graph.replay()
        return bucket.logits[:b].clone()

    def _record(self, size: int) -> _Bucket:
        bucket = _Bucket(size, self._max_pages, self._device)
        self._fill(bucket, [])  # all padding while recording
        plan = self._attention.graph_plan(
            bucket.tables,
            bucket.starts,
            bucket.context_lens,
            bucket.cu_keys,
            self._max_pages * self._page_size,
        )

        def forward() -> None:
            bucket.logits = self._model(
                bucket.token_ids,
                bucket.positions,
                bucket.slots,
                bucket.rows,
                self._pool,
                self._attention,
                plan,
            )

        bucket.graph = self._capture(forward, self._memory)
        log.info("cuda graphs: decode of %d sequences recorded", size)
        return bucket

    def _fill(self, bucket: _Bucket, chunks: Sequence[SeqChunk]) -> None:
        """Copy the step's inputs into the bucket's buffers, padding past len(chunks)."""
        ps, n = self._page_size, bucket.size
        pad = n - len(chunks)
        tables = torch.zeros(n, self._max_pages, dtype=torch.int32)
        for i, c in enumerate(chunks):
            used = -(-c.context_len // ps)
            tables[i, :used] = torch.tensor(checked_table(c, ps)[:used], dtype=torch.int32)
        tables[len(chunks) :, 0] = self._scratch
        ids = [c.token_ids[0] for c in chunks] + [0] * pad
        positions = [c.positions[0] if c.positions else c.start_pos for c in chunks] + [0] * pad
        slots = [c.block_table[c.start_pos // ps] * ps + c.start_pos % ps for c in chunks]
        slots += [self._scratch * ps] * pad
        lens = [c.context_len for c in chunks] + [1] * pad
        cu = list(itertools.accumulate(lens, initial=0))
        for buffer, values in (
            (bucket.token_ids, ids),
            (bucket.positions, positions),
            (bucket.slots, slots),
            (bucket.context_lens, lens),
            (bucket.cu_keys, cu),
        ):
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)
        bucket.tables.copy_(tables, non_blocking=True)
