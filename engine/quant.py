"""Linear layers: plain, and int8 through torch's own CPU kernels.

Decode on a CPU is memory-bound: every step reads every weight once, so smaller
weights are faster. Two int8 modes (figures in bench/README.md):
- "int8": fbgemm's dynamic int8 linear: weights int8 per output channel, activations
  quantized per call. AVX2 kernels, the fast mode here. Activations of a Llama have
  outlier channels that one activation scale flattens, so each layer's input is
  divided by a per-channel smoothing factor calibrated on a short text at load, and
  its weight columns multiplied by it (SmoothQuant, Xiao et al. 2023); each token is
  scaled to its own range before fbgemm's per-tensor activation quantization.
- "int8wo": weight-only int8 via `torch._weight_int8pack_mm`, activations in fp32.
  The more accurate, but its CPU kernel is slower than fp32 without AVX-512.
int4 (`_weight_int4pack_mm_for_cpu`) was measured slower than fp32 here and is left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SMOOTHING_ALPHA = 0.5  # how much of the activation range moves into the weights


class Linear(nn.Module):
    """y = x W^T (+ b), weights as given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights with per-channel scales, fp32 activations."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = _per_channel_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x, self.qweight, self.scales)
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
    model: nn.Module, mode: str, absmax: dict[str, torch.Tensor] | None = None
) -> None:
    """Replace every `Linear` of `model` in place by its `mode` ("int8" or "int8wo") form.

    Args:
        absmax: calibrated input ranges from `input_absmax`, for the smoothing of "int8".
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        weight, bias = module.weight.data, None if module.bias is None else module.bias.data
        if mode == "int8":
            new: nn.Module = DynamicInt8Linear(weight, bias, (absmax or {}).get(name))
        elif mode == "int8wo":
            new = WeightOnlyInt8Linear(weight, bias)
        else:
            raise ValueError(f"unknown quant mode {mode!r}")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
