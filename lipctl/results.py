"""What the syscalls answer, as typed structs (defined once, in sched/results.py, beside
the arguments' structs in sched/schema.py)."""

from symphony.sched.results import (
    FinishReason,
    ForwardResult,
    GenerateResult,
    Output,
    Piece,
    Stat,
    TokenLogprob,
    Usage,
    VerifyResult,
    logit_values,
)

__all__ = [
    "FinishReason",
    "ForwardResult",
    "GenerateResult",
    "Output",
    "Piece",
    "Stat",
    "TokenLogprob",
    "Usage",
    "VerifyResult",
    "logit_values",
]
