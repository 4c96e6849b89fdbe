"""Speculative verification: which draft tokens the model accepts, and the next token.

Greedy: a draft token is kept while it equals the argmax, so the tokens are exactly those
of greedy decoding. Sampled: rejection sampling (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding"): draft token x with draft probability q(x)
is kept with probability min(1, p(x) / q(x)); the first rejected one is replaced by a
draw from max(0, p - q), renormalised; if every draft token is kept, a bonus token is
drawn from the last row. The tokens then follow the target distribution p exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from symphony.engine.sampling import SamplingParams, constrain, draw, filtered_probs
from symphony.sched import args as A


@dataclass
class VerifyState:
    """One `verify` call: its draft, the draft's distributions, the rows seen so far."""

    draft: list[int]
    first: int  # the new-token index whose prediction checks draft[0] (-1: the file's last)
    draft_probs: list[dict[int, float]] | None  # None: a deterministic drafter
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # new-token index -> logits
    ahead: bool = False  # also the likeliest tokens past the rejected one (`guesses_after`)
    grammar_takes: int | None = None  # draft tokens a grammar allows; rows past are unmasked
    accepted: int = 0
    token: int | None = None
    after: list[int] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        """The new-token indices whose predictions verification reads."""
        return list(range(self.first, self.first + len(self.draft) + 1))


def parse_draft_probs(
    spec: list[dict[int, float]], draft: Sequence[int], vocab_size: int
) -> list[dict[int, float]]:
    """`draft_probs` (per draft token, the drafter's {id: prob}), checked."""
    if len(spec) != len(draft):
        raise A.einval("draft_probs must hold one map per draft token")
    for token, probs in zip(draft, spec, strict=True):
        if len(probs) > vocab_size or any(not 0 <= k < vocab_size for k in probs):
            raise A.einval(f"draft_probs ids must be token ids in 0..{vocab_size - 1}")
        if any(not 0.0 <= v <= 1.0 for v in probs.values()):  # NaN fails too
            raise A.einval("draft_probs values must be probabilities in [0, 1]")
        if probs.get(token, 0.0) <= 0.0:
            raise A.einval(f"draft token {token} has probability 0 in its draft_probs")
        if sum(probs.values()) > 1.0 + 1e-3:
            raise A.einval("a draft_probs map sums past 1")
    return spec


def guesses_after(rows: Sequence[torch.Tensor], accepted: int, params: SamplingParams) -> list[int]:
    """The likeliest token (under the sampler's bias and masks) in each row past the
    correction's: what follows each of draft[accepted:], the rejected token first, were
    the ones before it right. Nothing when the whole draft was accepted."""
    return [int(constrain(row.float(), params).argmax()) for row in rows[accepted + 1 :]]


def accept(
    rows: Sequence[torch.Tensor],
    draft: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_probs: Sequence[Mapping[int, float]] | None,
) -> tuple[int, int]:
    """(draft tokens accepted, the correction or bonus token) from the len(draft) + 1
    rows of logits: row i is the prediction draft[i] is checked against."""
    if params.greedy:
        for i, token in enumerate(draft):
            best = int(constrain(rows[i].float(), params).argmax())
            if best != token:
                return i, best
        return len(draft), int(constrain(rows[-1].float(), params).argmax())
    for i, token in enumerate(draft):
        p = filtered_probs(rows[i], params)
        q = _dense(draft_probs[i] if draft_probs else {token: 1.0}, p)
        ratio = float(p[token]) / float(q[token])
        if float(torch.rand((), generator=generator)) < min(1.0, ratio):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        choice = residual / total if total > 0 else p
        return i, draw(choice, generator)
    bonus = filtered_probs(rows[-1], params)
    return len(draft), draw(bonus, generator)


def _dense(probs: Mapping[int, float], like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[list(probs)] = torch.tensor(list(probs.values()), dtype=like.dtype, device=like.device)
    return q
