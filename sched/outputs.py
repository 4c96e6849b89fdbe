"""What a forward returns about the predictions after chosen tokens.

The wire form is a list of maps, each `{"at": i | [i, ...], "sample", "logprob",
"logprobs": [ids], "top_k": k, "entropy", "logits"}`; `at` counts the new tokens from 0,
and -1 is the file's last token before them (computed again). Each asked index becomes
one `OutputSpec`; its answer is computed from that row's logits in the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from symphony.sched import args as A

MAX_TOP_K = 100
MAX_IDS = 1024  # ids one output may ask the logprobs of
MAX_LOGIT_ROWS = 32  # raw logits rows a call may ask (4 bytes x vocab each)
MAX_ROWS = 4096  # output rows one call may ask


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
_FIELDS = {"at", "sample", "logprob", "logprobs", "top_k", "entropy", "logits"}


def parse_outputs(
    spec: Any, num_new: int, sampling: bool, vocab_size: int
) -> dict[int, OutputSpec]:
    """The outputs a forward asks, by index (-1..num_new-1).

    Default: a sample after the last new token when the call has a sampler, else none.

    Raises:
        StoreError: EINVAL naming what is wrong.
    """
    if spec is None:
        return {num_new - 1: SAMPLE} if sampling and num_new else {}
    if not isinstance(spec, list):
        raise A.einval("outputs must be a list of maps")
    found: dict[int, OutputSpec] = {}
    for item in spec:
        if not isinstance(item, dict):
            raise A.einval("outputs must be a list of maps")
        if bad := set(item) - _FIELDS:
            raise A.einval(f"unknown output field {sorted(map(str, bad))[0]!r}")
        one = _one_output(item, vocab_size)
        if one.sample and not sampling:
            raise A.einval("an output samples, but the call has no sampler")
        at = item.get("at", num_new - 1)
        indices = at if isinstance(at, list) else [at]
        for i in indices:
            if type(i) is not int or not -1 <= i < num_new:
                raise A.einval(f"output index {i!r} outside -1..{num_new - 1}")
            found[i] = found[i].merge(one) if i in found else one
        if len(found) > MAX_ROWS:
            raise A.einval(f"more than {MAX_ROWS} output rows")
    if sum(1 for s in found.values() if s.logits) > MAX_LOGIT_ROWS:
        raise A.einval(f"raw logits of at most {MAX_LOGIT_ROWS} rows a call")
    return found


def _one_output(item: dict[str, Any], vocab_size: int) -> OutputSpec:
    ids = A.int_list(item, "logprobs", [])
    if len(ids) > MAX_IDS:
        raise A.einval(f"logprobs of at most {MAX_IDS} ids an output")
    if any(not 0 <= i < vocab_size for i in ids):
        raise A.einval(f"logprobs ids must be token ids in 0..{vocab_size - 1}")
    top_k = A.get(item, "top_k", int, 0)
    if not 0 <= top_k <= MAX_TOP_K:
        raise A.einval(f"top_k must be in 0..{MAX_TOP_K}")
    return OutputSpec(
        sample=A.get(item, "sample", bool, False),
        logprob=A.get(item, "logprob", bool, False),
        logprobs=tuple(ids),
        top_k=top_k,
        entropy=A.get(item, "entropy", bool, False),
        logits=A.get(item, "logits", bool, False),
    )


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
