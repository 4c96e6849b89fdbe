"""Generating from many prompts at once straight on the engine, without the server.

For the demo, the tests and the benchmarks: each sequence owns its pages, prompts are
prefilled in chunks, then all sequences decode together, one token each per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from symphony.engine.batch import SeqChunk
from symphony.engine.engine import Engine
from symphony.engine.sampling import GREEDY, SamplingParams, make_generator


@dataclass
class Generation:
    """One sequence being generated: its tokens, pages and timings."""

    prompt_ids: list[int]
    params: SamplingParams = GREEDY
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pages
    done: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass
class GenerateStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class BatchGenerator:
    """Drives a set of generations to completion on one engine, returning pages after."""

    def __init__(self, engine: Engine, prefill_chunk: int = 512) -> None:
        self.engine = engine
        self.prefill_chunk = prefill_chunk
        self.stats = GenerateStats()

    def _grow(self, gen: Generation, num_tokens: int) -> None:
        need = self.engine.pages_for(num_tokens) - len(gen.pages)
        if need > 0:
            gen.pages.extend(self.engine.pool.allocate(need))

    def _next_token(self, gen: Generation, logits: torch.Tensor, max_tokens: int) -> None:
        token = self.engine.sample(logits, [gen.params], [gen.generator])[0]
        if token is None:
            raise ValueError("the logits are not finite: the model's weights or K/V are broken")
        gen.output_ids.append(token)
        if token in self.engine.tokenizer.stop_token_ids or len(gen.output_ids) >= max_tokens:
            gen.done = True

    def prefill(self, gens: Sequence[Generation], max_tokens: int) -> None:
        """Compute every prompt (in chunks) and sample each sequence's first token."""
        t0 = time.perf_counter()
        for gen in gens:
            prompt = gen.prompt_ids
            self._grow(gen, len(prompt))
            while gen.num_computed < len(prompt):
                end = min(len(prompt), gen.num_computed + self.prefill_chunk)
                last = end == len(prompt)
                chunk = SeqChunk(
                    prompt[gen.num_computed : end],
                    gen.num_computed,
                    gen.pages,
                    num_logits=1 if last else 0,
                )
                logits = self.engine.step([chunk])
                self.stats.prefill_tokens += end - gen.num_computed
                gen.num_computed = end
                if last:
                    self._next_token(gen, logits, max_tokens)
        self.stats.prefill_seconds += time.perf_counter() - t0

    def decode(self, gens: Sequence[Generation], max_tokens: int) -> None:
        """Decode all unfinished sequences together, one token each per step."""
        t0 = time.perf_counter()
        while active := [g for g in gens if not g.done]:
            chunks = []
            for gen in active:
                self._grow(gen, gen.num_computed + 1)
                chunks.append(SeqChunk([gen.output_ids[-1]], gen.num_computed, gen.pages))
            logits = self.engine.step(chunks)
            for row, gen in enumerate(active):
                gen.num_computed += 1
                self._next_token(gen, logits[row : row + 1], max_tokens)
            self.stats.decode_tokens += len(active)
        self.stats.decode_seconds += time.perf_counter() - t0

    def release(self, gens: Sequence[Generation]) -> None:
        for gen in gens:
            self.engine.pool.decref(gen.pages)
            gen.pages = []

    def run(self, gens: Sequence[Generation], max_tokens: int) -> list[list[int]]:
        """Generate up to `max_tokens` for each sequence; return the new token ids."""
        try:
            self.prefill(gens, max_tokens)
            self.decode(gens, max_tokens)
        finally:
            self.release(gens)
        return [g.output_ids for g in gens]


def generate(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    params: SamplingParams = GREEDY,
) -> list[list[int]]:
    """Generate from each prompt together in one batch; returns new token ids per prompt."""
    gens = [
        Generation(
            list(p),
            params,
            None if params.seed is None else make_generator(params.seed + i, engine.config.device),
        )
        for i, p in enumerate(prompts)
    ]
    return BatchGenerator(engine).run(gens, max_tokens)
