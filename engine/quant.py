"""Linear layers: plain, and int8 through torch's own CPU kernels.

Decode on a CPU is memory-bound: every step reads every weight once, so smaller
weights are faster. Two int8 modes, measured on the 2-core AVX2 machine (bench/):
- "int8": fbgemm's dynamic int8 linear (weights int8 per output channel, activations
  quantized per call). AVX2 kernels; the fast one here.
- "int8wo": weight-only int8 via `torch._weight_int8pack_mm`, activations in fp32.
  More accurate, but its CPU kernel is slower than fp32 on a machine without AVX-512.
int4 (`_weight_int4pack_mm_for_cpu`) was measured slower than fp32 here and is left out.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


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
    """fbgemm dynamic-quantized linear: int8 weights, activations quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = _per_channel_int8(weight)
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor types are deprecated, fbgemm is not
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zero_points, 0)
        b = None if bias is None else bias.float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so AVX2's int16 pair sums cannot saturate
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


class WeightOnlyInt8Linear(nn.Module):
    """int8 weights with per-channel scales, fp32 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = _per_channel_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(weight.dtype))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str) -> nn.Module:
    """A linear layer over `weight` [out, in] in the given quant mode."""
    if quant == "int8":
        return DynamicInt8Linear(weight, bias)
    if quant == "int8wo":
        return WeightOnlyInt8Linear(weight, bias)
    return Linear(weight, bias)
