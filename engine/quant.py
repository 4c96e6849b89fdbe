"""Linear layers: plain, and the quantized forms the engine swaps in on a CPU.

Decode on a CPU is memory-bound: every step reads every weight once, so smaller
weights are faster. Two modes (figures in bench/README.md):
- "int8": int8 weights in groups of 32 (engine/group_int8.py): exact for a GGUF model's
  Q4_1 and Q8_0 blocks, a quarter of fp32's bytes, with fp32 activations in an AVX2
  kernel, or int16 ones (by groups of 32) in an AVX-512 VNNI kernel where the CPU has
  it. The default on a CPU where its check passes (quant_check).
- "w8a8": fbgemm's dynamic int8 linear: weights int8 per output channel, activations
  quantized per call (SmoothQuant-smoothed, per token). Faster at large batches, where
  the int8 activations' integer products pay, and approximate (top-1 agreement with
  fp32 0.89 on held-out text): opt-in only.
int4 (`_weight_int4pack_mm_for_cpu`) and weight-only per-channel int8
(`_weight_int8pack_mm`) were measured slower than fp32 on this AVX2 CPU, and per-channel
scales lose too much on a Q4_1 model (top-1 0.966, 11 of 20 answers unchanged).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from symphony.engine.group_int8 import GroupInt8Linear, group_int8_layers

SMOOTHING_ALPHA = 0.5  # how much of the activation range moves into the weights
# Up to this many rows the compiled kernel streams fp32 weights faster than torch's
# GEMM (2x at 1 to 16 rows on the 2-core AVX2 CPU, even at 32: bench/README.md)
FP32_STREAM_ROWS = 16


class Linear(nn.Module):
    """y = x W^T (+ b), weights as given.

    `kernels`: the compiled CPU kernels (fp32 on a CPU), whose stream computes steps of
    a few rows (decode); torch's GEMM computes the rest, and everything without them.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        kernels: ModuleType | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features = weight.shape[0]
        fits = weight.dtype == torch.float32 and weight.shape[1] % 8 == 0
        self._kernels = kernels if fits else None

    @property
    def nbytes(self) -> int:
        """Bytes a step reads."""
        return self.weight.numel() * self.weight.element_size()

    def kernel_form(self) -> tuple[str, list[torch.Tensor], int] | None:
        """(kind, tensors, most rows) as the compiled kernels take this layer, or None."""
        return None if self._kernels is None else ("fp32", [self.weight], FP32_STREAM_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and x.dim() == 2 and x.shape[0] <= FP32_STREAM_ROWS:
            y = self._kernels.fp32_mm(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def _per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class DynamicInt8Linear(nn.Module):
    """fbgemm dynamic-quantized linear over smoothed inputs: y = (x / s) (W s)^T + b."""

    inv_smooth: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, input_absmax: torch.Tensor | None
    ) -> None:
        super().__init__()
        w = weight.float()
        smooth = torch.ones(w.shape[1])
        if input_absmax is not None:
            a = input_absmax.float().clamp(min=1e-5)
            w_absmax = w.abs().amax(dim=0).clamp(min=1e-5)
            smooth = (a**SMOOTHING_ALPHA / w_absmax ** (1 - SMOOTHING_ALPHA)).clamp(1e-2, 1e2)
        self.register_buffer("inv_smooth", (1.0 / smooth).to(weight.dtype))
        q, scales = _per_channel_int8(w * smooth[None, :])
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor types are deprecated, fbgemm is not
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.nbytes = q.numel() + 8 * q.shape[0]  # int8 weights, a scale per channel
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fbgemm quantizes the whole input with one scale; dividing each token by its own
        # range first makes that one scale fit every token (a per-token quantization).
        # Full 8-bit activations (reduce_range=False). 7-bit ones keep AVX2's int16 pair
        # sums from ever saturating, but cost more: on the real model they doubled the
        # mean KL to fp32 on chat prompts (0.053 -> 0.083) and flipped the demo answer.
        xs = x * self.inv_smooth
        if xs.shape[0] == 1:  # one token: its own range is the tensor's
            y = torch.ops.quantized.linear_dynamic(xs, self._packed, False)
        else:
            rows = xs.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
            y = torch.ops.quantized.linear_dynamic(xs / rows, self._packed, False) * rows
        return y if self.bias is None else y + self.bias


def input_absmax(model: nn.Module, run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| seen by every `Linear` of `model` while `run()` runs."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):

            def hook(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                m = args[0].detach().abs().flatten(0, -2).amax(dim=0)
                seen[name] = m if name not in seen else torch.maximum(seen[name], m)

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def quantize_linears(
    model: nn.Module,
    mode: str,
    absmax: dict[str, torch.Tensor] | None = None,
    kernels: ModuleType | None = None,
) -> dict[str, nn.Module]:
    """Replace the `Linear`s of `model` in place by their `mode` ("int8" or "w8a8") form.

    Args:
        absmax: calibrated input ranges from `input_absmax`, for the smoothing of "w8a8".
        kernels: the compiled CPU kernels "int8" streams its weights with (None: the
            torch path, correct and slower).

    Returns:
        the replaced modules by name, for `restore_linears`.
    """
    plain = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    weights = {
        n: (m.weight.data, None if m.bias is None else m.bias.data) for n, m in plain.items()
    }
    if mode == "int8":
        new = group_int8_layers(weights, kernels)
    elif mode == "w8a8":
        new = {n: DynamicInt8Linear(w, b, (absmax or {}).get(n)) for n, (w, b) in weights.items()}
    else:
        raise ValueError(f"unknown quant mode {mode!r}")
    _set_modules(model, new)
    return {n: plain[n] for n in new}


def linear_bytes(model: nn.Module) -> int:
    """Bytes of weights every step reads: each linear layer's, in the form it runs in."""
    kinds = (Linear, DynamicInt8Linear, GroupInt8Linear)
    return sum(m.nbytes for m in model.modules() if isinstance(m, kinds))


def restore_linears(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Undo `quantize_linears`, given what it returned."""
    _set_modules(model, originals)


def _set_modules(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
    changed = getattr(model, "linears_changed", None)  # LlamaModel's compiled decoder
    if changed is not None:
        changed()
