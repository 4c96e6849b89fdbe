"""Choosing the next token from logits: greedy, temperature, top-k/p, min-p, bias, masks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_BIAS = 100.0  # |logit_bias| at most, as OpenAI's API allows


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    allowed_token_ids: frozenset[int] | None = None  # None: every token
    blocked_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        # comparisons are False for NaN: each check is written so that NaN fails it
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in 0..2**64-1, got {self.seed}")
        for token, bias in self.logit_bias.items():
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise ValueError(
                    f"logit_bias of token {token} must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                    f"got {bias}"
                )
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is empty: no token could be chosen")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id in the bias or masks is outside the vocabulary."""
        ids = [*self.logit_bias, *(self.allowed_token_ids or ()), *self.blocked_token_ids]
        bad = [i for i in ids if not 0 <= int(i) < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})")
        if self.allowed_token_ids is not None and self.allowed_token_ids <= self.blocked_token_ids:
            raise ValueError("every allowed token is also blocked: no token could be chosen")
        if len(self.blocked_token_ids) >= vocab_size:
            raise ValueError("blocked lists every token: no token could be chosen")


GREEDY = SamplingParams(temperature=0.0)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A random stream for one request: the same seed gives the same tokens."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def constrain(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply logit bias and allowed/blocked masks to one row of logits."""
    if not (params.logit_bias or params.allowed_token_ids is not None or params.blocked_token_ids):
        return row
    row = row.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), device=row.device)
    if params.allowed_token_ids is not None:
        keep = torch.full_like(row, float("-inf"))
        ids = torch.tensor(sorted(params.allowed_token_ids), device=row.device)
        keep[ids] = 0.0
        row += keep
    if params.blocked_token_ids:
        row[torch.tensor(sorted(params.blocked_token_ids), device=row.device)] = float("-inf")
    return row


def filtered_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy request samples from: [vocab] probabilities."""
    logits = constrain(row.float(), params)
    # shifted so the best is 0 before dividing: a tiny temperature then sends the others
    # to -inf (the greedy limit) instead of every logit to +-inf (NaN after softmax)
    logits = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
        drop = order[before >= params.top_p]
        probs[drop] = 0.0
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from `probs` [vocab] (non-negative, not all zero): the first whose
    cumulative mass passes one uniform draw, in float64. torch.multinomial cost 1.8 ms a
    row here (it drew a number per token), a fifth of a step at batch 8; this, 0.1."""
    cdf = probs.double().cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    # the first index whose mass exceeds u has a non-zero probability of its own
    index = int(torch.searchsorted(cdf, u, right=True))
    if index == probs.numel():  # u rounded up to the total: the last token with mass
        index = int(torch.nonzero(probs).max())
    return index


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of `logits` [num_rows, vocab] is finite throughout: its largest
    and smallest are (a NaN is both). Two reductions: isfinite().all() made three passes
    and a mask, 0.43 ms at batch 8 (49,152 tokens), twice a step; these take 0.05."""
    return (torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))).tolist()


def sample(
    logits: torch.Tensor,  # [num_rows, vocab]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[int | None]:
    """One token per row, or None for a row whose logits are not finite (its context's
    K/V are out of range): that row fails alone. `allowed[i]` ([vocab] bool, a grammar's
    mask) leaves row i only those tokens. Each row's result depends only on its own
    logits, params, mask and generator, never on the other rows of the batch."""
    ok = finite_rows(logits)
    out: list[int | None] = [None] * logits.shape[0]
    masks = allowed if allowed is not None else [None] * len(params)
    rows = [i for i in range(len(params)) if ok[i]]
    plain = [i for i in rows if params[i] == GREEDY and masks[i] is None]  # argmax together
    in_plain = set(plain)
    if plain:
        ids = logits[plain].argmax(dim=-1).tolist()
        for i, token in zip(plain, ids, strict=True):
            out[i] = token
    for i in rows:
        if i in in_plain:
            continue
        p, row = params[i], logits[i]
        mask = masks[i]
        if mask is not None:
            row = row.float().masked_fill(~mask.to(row.device), float("-inf"))
            if not bool(torch.isfinite(row).any()):  # the mask left nothing: no argmax
                continue
        if p.greedy:
            out[i] = int(constrain(row.float(), p).argmax())
        else:
            probs = filtered_probs(row, p)
            if not finite_rows(probs[None])[0]:  # checked at the boundary; kept safe
                continue
            out[i] = draw(probs, generators[i])
    return out


def top_logprobs(row: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The `k` most likely next tokens with their log-probabilities."""
    logp = torch.log_softmax(row.float(), dim=-1)
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return list(zip(ids.tolist(), values.tolist(), strict=True))
