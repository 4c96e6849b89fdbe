"""The Llama forward over a flat batch of tokens from many sequences, K/V in pages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symphony.engine.attention import AttentionBackend
from symphony.engine.config import ModelConfig
from symphony.engine.errors import LoadError
from symphony.engine.page_pool import PagePool
from symphony.engine.quant import Linear
from symphony.engine.rope import apply_rope, rope_tables


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: ModuleType | None = None
) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension of x [num_tokens, hidden].

    With the compiled CPU kernels, one call (torch's six ops cost 34 us at batch 1).
    """
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class DecoderLayer(nn.Module):
    """Pre-norm attention then SwiGLU MLP, each with a residual."""

    def __init__(
        self, config: ModelConfig, w: dict[str, torch.Tensor], kernels: ModuleType | None
    ) -> None:
        super().__init__()
        self.kernels = kernels  # the compiled CPU kernels (fp32 on a CPU), else None
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.attn_norm = nn.Parameter(w["attn_norm.weight"], requires_grad=False)
        self.ffn_norm = nn.Parameter(w["ffn_norm.weight"], requires_grad=False)
        # Q, K and V in one matmul; gate and up in another
        qkv = torch.cat([w["q.weight"], w["k.weight"], w["v.weight"]])
        qkv_bias = None
        if config.qkv_bias:
            qkv_bias = torch.cat([w["q.bias"], w["k.bias"], w["v.bias"]])
        self.qkv = Linear(qkv, qkv_bias, kernels)
        self.o = Linear(w["o.weight"], kernels=kernels)
        self.gate_up = Linear(torch.cat([w["gate.weight"], w["up.weight"]]), kernels=kernels)
        self.down = Linear(w["down.weight"], kernels=kernels)

    def linears(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """qkv, o, gate_up, down: the order the compiled decoder takes them in."""
        return self.qkv, self.o, self.gate_up, self.down

    def forward(
        self,
        h: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, head_dim / 2]
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attention: AttentionBackend,
        plan: Any,
    ) -> torch.Tensor:
        t = h.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = rms_norm(h, self.attn_norm, self.eps, self.kernels)
        qkv = self.qkv(x)
        # rope on Q and K, then this step's K/V into their pages, then attention over the
        # pages. A row gone non-finite fails its own call (the scheduler checks logits),
        # but what it writes is made finite: other sequences' attention masks its slots,
        # and a masked NaN still poisons a softmax
        if self.kernels is not None:  # the fourteen ops below in one call
            q = self.kernels.rope_store_kv(qkv, nh, nkv, cos, sin, slot_mapping, k_cache, v_cache)
        else:
            qk = apply_rope(
                qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d), cos[:, None], sin[:, None]
            )
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)
            k, v = torch.nan_to_num(k, 0.0, 0.0, 0.0), torch.nan_to_num(v, 0.0, 0.0, 0.0)
            if k_cache.dtype != k.dtype:  # finite in the pages' dtype too
                top = torch.finfo(k_cache.dtype).max
                k, v = k.clamp(-top, top), v.clamp(-top, top)
            k_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
            v_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        attn = attention(q, k_cache, v_cache, plan)  # [num_tokens, num_heads, head_dim]
        h = h + self.o(attn.view(t, nh * d))
        x = rms_norm(h, self.ffn_norm, self.eps, self.kernels)
        gate_up = self.gate_up(x)
        if self.kernels is not None:
            return h + self.down(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head of a Llama-family model."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: str,
        kernels: ModuleType | None = None,
    ) -> None:
        """`kernels`: the compiled CPU kernels to run norms, RoPE and the K/V store with
        (only for fp32 on a CPU), else None for torch's ops."""
        super().__init__()
        self.config = config
        self.kernels = kernels
        w = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        missing = [n for n in ("embed.weight", "norm.weight") if n not in w]
        if missing:
            raise LoadError(f"model weights lack {', '.join(missing)}")
        self.embed = nn.Parameter(w["embed.weight"], requires_grad=False)
        self.norm = nn.Parameter(w["norm.weight"], requires_grad=False)
        layers: list[DecoderLayer] = []
        for i in range(config.num_layers):
            prefix = f"layers.{i}."
            lw = {n[len(prefix) :]: t for n, t in w.items() if n.startswith(prefix)}
            try:
                layers.append(DecoderLayer(config, lw, kernels))
            except KeyError as exc:
                raise LoadError(f"model weights lack {prefix}{exc.args[0]}") from exc
        self.layers = nn.ModuleList(layers)
        self._layers = layers  # the same, typed
        head = w["embed.weight"] if config.tie_embeddings else w.get("lm_head.weight")
        if head is None:
            raise LoadError("model weights lack lm_head.weight")
        self.lm_head = Linear(head, kernels=kernels)
        # the layers in one compiled call, where they can be (see _decoder)
        self.fuse = True
        self._fused: tuple[Any, int] | None = None
        self._fused_stale = True
        cos, sin = rope_tables(config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def linears_changed(self) -> None:
        """Say that layers' linears were swapped (quant's quantize and restore call it):
        the compiled decoder is built again, from the new ones, at its next use."""
        self._fused_stale = True

    @contextlib.contextmanager
    def layers_as_modules(self) -> Iterator[None]:
        """Run every layer as its Python module meanwhile (their hooks fire)."""
        before, self.fuse = self.fuse, False
        try:
            yield
        finally:
            self.fuse = before

    def _decoder(self, rows: int) -> Any | None:
        """The compiled kernels' decoder (engine/cpu_decoder.cpp) over the layers, where
        every linear has a kernel for `rows` rows; else None."""
        if self.kernels is None or not self.fuse:
            return None
        if self._fused_stale:
            self._fused, self._fused_stale = self._build_decoder(), False
        if self._fused is None or rows > self._fused[1]:
            return None
        return self._fused[0]

    def _build_decoder(self) -> tuple[Any, int] | None:
        """(decoder, most rows its linears' kernels take), or None where one has no kernel."""
        k = self.kernels
        assert k is not None
        linears = [m for layer in self._layers for m in layer.linears()]
        forms = []
        for m in linears:
            form = getattr(m, "kernel_form", lambda: None)()  # w8a8's layers have none
            if form is None:
                return None
            forms.append(form)
        made = [
            k.kernel_linear(kind, tensors, m.out_features, m.bias)
            for m, (kind, tensors, _) in zip(linears, forms, strict=True)
        ]
        c = self.config
        layers = [
            k.DecoderLayerWeights(layer.attn_norm, layer.ffn_norm, *made[4 * i : 4 * i + 4])
            for i, layer in enumerate(self._layers)
        ]
        decoder = k.Decoder(
            layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.head_dim**-0.5
        )
        return decoder, min(most for _, _, most in forms)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens] rotary positions (not the slots)
        slot_mapping: torch.Tensor,  # [num_tokens] where each token's K/V goes
        logits_indices: torch.Tensor,  # [num_logits]
        pool: PagePool,
        attention: AttentionBackend,
        plan: Any,
    ) -> torch.Tensor:
        """Logits [num_logits, vocab] (fp32) of the rows in `logits_indices`."""
        h = F.embedding(token_ids, self.embed)
        cos = self.rope_cos[positions]  # [num_tokens, head_dim / 2]
        sin = self.rope_sin[positions]
        whole = getattr(attention, "whole_step_kernel", lambda plan: None)(plan)
        decoder = None if whole is None else self._decoder(h.shape[0])
        if whole is not None and decoder is not None:  # every layer in one call, same ops
            h = decoder.run(
                h, cos, sin, slot_mapping, pool.k_cache, pool.v_cache, *whole.kernel_args()
            )
        else:
            for i, layer in enumerate(self.layers):
                h = layer(
                    h, cos, sin, slot_mapping, pool.k_cache[i], pool.v_cache[i], attention, plan
                )
        if logits_indices.numel() == 0:
            return h.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        h = rms_norm(h[logits_indices], self.norm, self.config.rms_norm_eps, self.kernels)
        return self.lm_head(h).float()
