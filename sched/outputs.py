"""What a forward returns about the predictions after chosen tokens.

The wire form is a list of `schema.OutputAsk` maps, each `{"at": i | [i, ...], "sample",
"logprob", "logprobs": [ids], "top_k": k, "entropy", "logits"}`; `at` counts the new
tokens from 0, and -1 is the file's last token before them (computed again). Each asked
index becomes one `OutputSpec`; its answer comes from that row's logits in the engine
thread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from symphony.sched import args as A
from symphony.sched import schema as S

MAX_IDS = 1024  # ids one output may ask the logprobs of
MAX_LOGIT_ROWS = 32  # raw logits rows a call may ask (4 bytes x vocab each)
MAX_ROWS = 4096  # output rows one call may ask
MAX_VALUES = 1 << 16  # logprobs asked (ids and top-k), over all rows of a call


@dataclass(frozen=True)
class OutputSpec:
    """What to return about the prediction after one token."""

    sample: bool = False  # a token drawn with the call's sampler
    logprob: bool = False  # the drawn token's log-probability
    logprobs: tuple[int, ...] = ()  # log-probabilities of these ids
    top_k: int = 0  # the k likeliest tokens with their log-probabilities
    entropy: bool = False  # of the model's distribution, in nats
    logits: bool = False  # the raw fp32 logits, as little-endian bytes

    @property
    def needs_logprobs(self) -> bool:
        return bool(self.logprob or self.logprobs or self.top_k or self.entropy)

    def merge(self, other: OutputSpec) -> OutputSpec:
        """Both asks at one index."""
        return replace(
            self,
            sample=self.sample or other.sample,
            logprob=self.logprob or other.logprob,
            logprobs=tuple(dict.fromkeys(self.logprobs + other.logprobs)),
            top_k=max(self.top_k, other.top_k),
            entropy=self.entropy or other.entropy,
            logits=self.logits or other.logits,
        )


SAMPLE = OutputSpec(sample=True)


def parse_outputs(
    asks: list[S.OutputAsk] | None, num_new: int, sampling: bool, vocab_size: int
) -> dict[int, OutputSpec]:
    """The outputs a forward asks, by index (-1..num_new-1).

    Default: a sample after the last new token when the call has a sampler, else none.

    Raises:
        StoreError: EINVAL naming what is wrong.
    """
    if asks is None:
        return {num_new - 1: SAMPLE} if sampling and num_new else {}
    found: dict[int, OutputSpec] = {}
    mentions = 0  # indices named over all asks: what the loop below costs
    for ask in asks:
        if len(ask.logprobs) > MAX_IDS:
            raise A.einval(f"logprobs of at most {MAX_IDS} ids at one index")
        if any(not 0 <= i < vocab_size for i in ask.logprobs):
            raise A.einval(f"logprobs ids must be token ids in 0..{vocab_size - 1}")
        one = OutputSpec(
            ask.sample, ask.logprob, tuple(ask.logprobs), ask.top_k, ask.entropy, ask.logits
        )
        if one.sample and not sampling:
            raise A.einval("an output samples, but the call has no sampler")
        at = num_new - 1 if ask.at is None else ask.at
        indices = at if isinstance(at, list) else [at]
        mentions += len(indices)
        if mentions > MAX_ROWS:
            raise A.einval(f"more than {MAX_ROWS} output rows")
        for i in indices:
            if not -1 <= i < num_new:
                raise A.einval(f"output index {i} outside -1..{num_new - 1}")
            found[i] = found[i].merge(one) if i in found else one
            if len(found[i].logprobs) > MAX_IDS:
                raise A.einval(f"logprobs of at most {MAX_IDS} ids at one index")
    if sum(len(s.logprobs) + s.top_k for s in found.values()) > MAX_VALUES:
        raise A.einval(f"more than {MAX_VALUES} logprobs asked in one call")
    if sum(1 for s in found.values() if s.logits) > MAX_LOGIT_ROWS:
        raise A.einval(f"raw logits of at most {MAX_LOGIT_ROWS} rows a call")
    return found


def describe(row: torch.Tensor, spec: OutputSpec, token: int | None) -> dict[str, Any]:
    """The answer to `spec` from one row of logits [vocab] (finite), `token` the drawn one."""
    out: dict[str, Any] = {}
    if token is not None:
        out["token"] = token
    if spec.needs_logprobs:
        logp = torch.log_softmax(row.float(), dim=-1)
        if spec.logprob and token is not None:
            out["logprob"] = float(logp[token])
        if spec.logprobs:
            asked = logp[list(spec.logprobs)].tolist()
            out["logprobs"] = [[i, v] for i, v in zip(spec.logprobs, asked, strict=True)]
        if spec.top_k:
            values, ids = torch.topk(logp, min(spec.top_k, logp.numel()))
            out["top_k"] = [[i, v] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        if spec.entropy:
            p = logp.exp()
            out["entropy"] = float(-(p * logp.masked_fill(p == 0, 0.0)).sum())
    if spec.logits:
        out["logits"] = row.float().cpu().numpy().astype("<f4").tobytes()
    return out
