"""int8 weights in groups of 32 inputs, each with a scale and a zero: exact for GGUF models.

A GGUF file's Q4_1 block is 32 weights m + d*k (k = 0..15) and a Q8_0 block 32
weights d*k (k = -127..127). One int8 group of 32 with its own scale and zero holds
either exactly: asymmetric (scale (max - min) / 255, so k*d is 17k steps) for the
first, symmetric (scale max|w| / 127) for the second; each group takes whichever of
the two fits it better. So the int8 model computes what the dequantized fp32 model
computes, up to fp32 rounding, from a quarter of the bytes.

Two kernels compute with them:
- where the CPU has AVX-512 VNNI, cpu_vnni.cpp for every step: each row of x goes to
  int16 by groups of 32 (an error of at most 1/65534 of a group's largest input), and
  vpdpwssd multiplies int8 by int16 at 2.5x fp32 FMA's rate, with the weights packed by
  16 channels (`pack_lanes`);
- elsewhere activations stay fp32: steps of up to STREAM_ROWS rows (decodes, batches,
  short chunks) go through the AVX2 kernel of cpu_matmul.cpp, which reads the weights
  packed by blocks of 3 channels (`pack_blocks`); steps of more rows (prefill) expand
  each weight to fp32 in a reused buffer and run torch's GEMM, where compute and not
  bytes is the cost.
Both kernels sum a row in one order whatever rows are beside it (the AVX2 one up to
STREAM_ROWS rows), so a row's bits do not depend on its batch.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32
# Up to this many rows the compiled kernel computes a step from the int8 weights
# (streamed below 12 rows, in fp32 tiles of 3 channels from 12); above it torch's fp32
# GEMM on expanded weights wins, its cache blocking beating the tiles' rereads of x
# (2-core Zen 3: the tiles 1.6x at 32 rows, 0.75x at 512 on the down projection)
STREAM_ROWS = 64


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 q [N, K] and fp32 scales, zeros [N, K / 32] with weight ~= q * scale + zero."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"input size {k} is not a multiple of {GROUP}")
    w = weight.float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    tiny = torch.finfo(torch.float32).tiny
    # asymmetric: q = -128..127 spans [lo, hi]
    scale_a = ((hi - lo) / 255).clamp(min=tiny)
    q_a = torch.round((w - lo[..., None]) / scale_a[..., None]).clamp(0, 255) - 128
    zero_a = lo + 128 * scale_a
    err_a = (q_a * scale_a[..., None] + zero_a[..., None] - w).abs().amax(-1)
    # symmetric: q = -127..127 spans [-max|w|, max|w|], zero 0
    scale_s = (w.abs().amax(-1) / 127).clamp(min=tiny)
    q_s = torch.round(w / scale_s[..., None]).clamp(-127, 127)
    err_s = (q_s * scale_s[..., None] - w).abs().amax(-1)
    sym = err_s < err_a
    q = torch.where(sym[..., None], q_s, q_a).to(torch.int8).reshape(n, k)
    scales = torch.where(sym, scale_s, scale_a).contiguous()
    zeros = torch.where(sym, torch.zeros_like(zero_a), zero_a).contiguous()
    return q.contiguous(), scales, zeros


BLOCK = 3  # channels the kernel packs side by side (cpu_matmul.cpp)


def _pack(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, channels: int, inputs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [N/c, K/i, c, i] with each i inputs of c channels side by side, scales and zeros
    [N/c, K/32, c]; N padded to a multiple of c with zero channels (the kernels write
    only the first N)."""
    n, k = q.shape
    pad = -n % channels
    q = F.pad(q, (0, 0, 0, pad))
    scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
    blocks = (n + pad) // channels
    packed = q.view(blocks, channels, k // inputs, inputs).permute(0, 2, 1, 3).contiguous()
    per_group = [t.view(blocks, channels, -1).transpose(1, 2).contiguous() for t in (scales, zeros)]
    return packed, per_group[0], per_group[1]


def pack_blocks(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_groups`' output in the AVX2 kernel's layout: q [N/3, K/8, 3, 8], scales
    and zeros [N/3, K/32, 3]."""
    return _pack(q, scales, zeros, BLOCK, 8)


LANES = 16  # channels the AVX-512 VNNI kernel packs, one a 32-bit lane (cpu_vnni.cpp)


def pack_lanes(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_groups`' output in the VNNI kernel's layout: q [N/16, K/2, 16, 2] (each
    pair of inputs of 16 channels side by side), scales and zeros [N/16, K/32, 16]."""
    return _pack(q, scales, zeros, LANES, 2)


def vnni_available(kernels: ModuleType | None) -> bool:
    """Whether the int8 layers run the AVX-512 VNNI kernel here."""
    return kernels is not None and kernels.vnni_supported()


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [N, K] of `quantize_groups`' output, in torch ops."""
    n, k = q.shape
    w = q.view(n, k // GROUP, GROUP).float() * scales[..., None] + zeros[..., None]
    return w.view(n, k)


class _Scratch:
    """One fp32 buffer that every layer expands its weight into, grown on demand."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, numel: int) -> torch.Tensor:
        if self.buffer.numel() < numel:
            self.buffer = torch.empty(numel)
        return self.buffer


class GroupInt8Linear(nn.Module):
    """y = x W^T (+ b), W held as int8 groups of 32 (see the module docstring)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernels: ModuleType | None,
        scratch: _Scratch,
    ) -> None:
        super().__init__()
        q, scales, zeros = quantize_groups(weight)
        self.out_features = weight.shape[0]
        self._vnni = vnni_available(kernels)
        if self._vnni:  # in the kernel's layout
            q, scales, zeros = pack_lanes(q, scales, zeros)
        elif kernels is not None:
            q, scales, zeros = pack_blocks(q, scales, zeros)
        self.register_buffer("q", q)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernels = kernels
        self._scratch = scratch

    @property
    def nbytes(self) -> int:
        """Bytes a step reads: the int8 weights, their scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.zeros))

    def kernel_form(self) -> tuple[str, list[torch.Tensor], int] | None:
        """(kind, tensors, most rows) as the compiled kernels take this layer, or None."""
        if self._kernels is None:
            return None
        tensors = [self.q, self.scales, self.zeros]
        return ("int8-vnni", tensors, sys.maxsize) if self._vnni else ("int8", tensors, STREAM_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernels
        if k is None:  # no compiled kernels here: correct, and slower than fp32
            y = F.linear(x, dequantize_groups(self.q, self.scales, self.zeros))
        elif self._vnni:
            y = k.group_int8_vnni_mm(x, self.q, self.scales, self.zeros, self.out_features)
        elif x.shape[0] <= STREAM_ROWS:
            y = k.group_int8_mm(x, self.q, self.scales, self.zeros, self.out_features)
        else:
            scratch = self._scratch.take(self.q.numel())
            w = k.group_int8_dequant(self.q, self.scales, self.zeros, self.out_features, scratch)
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias


def group_int8_layers(
    linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]], kernels: ModuleType | None
) -> dict[str, nn.Module]:
    """A GroupInt8Linear for each (weight, bias) by name, sharing one scratch buffer.

    Layers whose input size is not a multiple of 32 are left out (they stay fp32).
    `kernels`: the compiled CPU kernels, or None for the (slower) torch path.
    """
    scratch = _Scratch()
    out: dict[str, nn.Module] = {}
    for name, (weight, bias) in linears.items():
        if weight.shape[1] % GROUP:
            log.info("int8: %s stays fp32 (input size %d)", name, weight.shape[1])
            continue
        out[name] = GroupInt8Linear(weight, bias, kernels, scratch)
    return out
