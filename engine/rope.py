"""Rotary position embeddings, rotate-half as Hugging Face's Llama: the tables the forward
reads, the rotation, and turning keys already in the pool to other positions.

RoPE turns each pair (x1[i], x2[i]) of a key by the angle position * inv_freq[i], so a key
computed at p and turned by the angle of d is the key at p + d: a cached key moves to a
new position without its pre-RoPE value (kv_drop and kv_concat with `reposition`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from symphony.engine.config import ModelConfig
from symphony.engine.page_pool import PagePool


def rope_tables(config: ModelConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position, [max_position, head_dim / 2], in fp32."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(config.max_position, dtype=torch.float32), inv_freq)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope. x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, 1, d / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotate_cached_keys(
    pool: PagePool,
    slots: Sequence[int],
    shifts: Sequence[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Move the keys in flat `slots` (page * page_size + offset) of every layer from
    their position p to p + shifts[i], in fp32, cast back to the cache's dtype; values
    are left as they are. `cos` and `sin` are `rope_tables`'.

    Raises:
        ValueError: a shift as long as the tables or longer (checked here: on CUDA an
            index out of range is a device assert that ends the process).
    """
    if not slots:
        return
    longest = max(abs(s) for s in shifts)
    if longest >= cos.shape[0]:
        raise ValueError(f"a shift of {longest} positions; the tables end at {cos.shape[0] - 1}")
    device = pool.k_cache[0].device
    index = torch.tensor(list(slots), dtype=torch.long, device=device)
    shift = torch.tensor(list(shifts), dtype=torch.long, device=device)
    # the angle of -d is minus the angle of d: cos is the same, sin changes sign
    turn_cos = cos[shift.abs()].unsqueeze(1)  # [num_slots, 1, head_dim / 2]
    turn_sin = (sin[shift.abs()] * shift.sign().unsqueeze(1).to(sin.dtype)).unsqueeze(1)
    for cache in pool.k_cache:
        flat = cache.view(-1, *cache.shape[2:])  # [num_pages * page_size, num_kv_heads, head_dim]
        flat.index_copy_(0, index, apply_rope(flat.index_select(0, index), turn_cos, turn_sin))
