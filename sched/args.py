"""Checking syscall arguments: every bad argument is EINVAL with a sentence."""

from __future__ import annotations

import errno
from typing import Any

from symphony.engine.sampling import SamplingParams
from symphony.fs.errors import StoreError

_REQUIRED = object()


def einval(message: str) -> StoreError:
    return StoreError(errno.EINVAL, message)


def get(
    args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _REQUIRED
) -> Any:
    """`args[name]`, checked to be of `kind` (bools are not ints)."""
    if name not in args or args[name] is None:
        if default is _REQUIRED:
            raise einval(f"missing argument {name!r}")
        return default
    value = args[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise einval(f"argument {name!r} must be {_names(kinds)}")
    if not isinstance(value, kinds):
        raise einval(f"argument {name!r} must be {_names(kinds)}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)


def int_list(args: dict[str, Any], name: str, default: Any = _REQUIRED) -> list[int]:
    value = get(args, name, list, default)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise einval(f"argument {name!r} must be a list of token ids")
    return list(value)


def str_list(args: dict[str, Any], name: str) -> list[str]:
    value = get(args, name, list, [])
    if not all(isinstance(v, str) for v in value):
        raise einval(f"argument {name!r} must be a list of strings")
    return list(value)


def sampling_params(spec: Any, vocab_size: int) -> SamplingParams:
    """A sampler from its wire form: temperature, top_k, top_p, min_p, seed,
    logit_bias {id: bias}, allowed [ids], blocked [ids]."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise einval("sampler must be a map")
    known = {"temperature", "top_k", "top_p", "min_p", "seed", "logit_bias", "allowed", "blocked"}
    if bad := set(spec) - known:
        raise einval(f"unknown sampler field {sorted(map(str, bad))[0]!r}")
    bias = get(spec, "logit_bias", dict, {})
    if not all(isinstance(k, int) and isinstance(v, (int, float)) for k, v in bias.items()):
        raise einval("logit_bias must map token ids to numbers")
    allowed = int_list(spec, "allowed") if spec.get("allowed") is not None else None
    try:
        params = SamplingParams(
            temperature=float(get(spec, "temperature", (int, float), 1.0)),
            top_k=get(spec, "top_k", int, 0),
            top_p=float(get(spec, "top_p", (int, float), 1.0)),
            min_p=float(get(spec, "min_p", (int, float), 0.0)),
            seed=get(spec, "seed", int, None),
            logit_bias={int(k): float(v) for k, v in bias.items()},
            allowed_token_ids=None if allowed is None else frozenset(allowed),
            blocked_token_ids=frozenset(int_list(spec, "blocked", [])),
        )
        params.check_vocab(vocab_size)
    except ValueError as exc:
        raise einval(str(exc)) from None
    return params
