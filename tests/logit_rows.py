"""What the forward tests read from answers: an output's raw logits, and whether two
rows of logits agree."""

from __future__ import annotations

import array


def logits(result: dict, at: int) -> list[float]:
    """The fp32 logits a forward's output at new-token index `at` returned."""
    (out,) = [o for o in result["outputs"] if o["at"] == at]
    return array.array("f", out["logits"]).tolist()


def close(a: list[float], b: list[float], tolerance: float = 1e-4) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tolerance
