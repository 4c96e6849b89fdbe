"""Paged attention behind one interface, with two backends.

- `SdpaAttention` (engine/sdpa_attention.py): torch scaled_dot_product_attention over
  K/V gathered from the pages (CPU and any GPU), and on a CPU the compiled kernels'
  attention in place for decodes and short chunks.
- `FlashAttention`: flash-attn's varlen kernel reading K/V straight from the pages
  through the block table (CUDA with flash_attn installed); causal only, so a step with
  visible ranges goes through SDPA over the same pages.
- `TritonAttention` (engine/triton_attention.py): a Triton kernel over the block tables
  with visible ranges too; CUDA, or the CPU under Triton's interpreter (the tests).

`choose_attention` picks one and its page size.

Each reads K/V from the page pool, which the model has already written for this step.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any, Protocol

import torch

from symphony.engine.batch import AttnMetadata
from symphony.engine.sdpa_attention import SdpaAttention, SdpaPlan

log = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttnMetadata) -> Any:
        """Work shared by every layer of one step (index tensors, masks)."""

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: Any
    ) -> torch.Tensor:
        """Attention of q [num_tokens, num_heads, head_dim] over the cached K/V."""


def flash_attn_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class FlashAttention:
    """flash-attn's varlen kernel over paged K/V (CUDA only).

    flash-attn's paged KV wants pages of a multiple of 256 tokens; `choose_attention`
    refuses this backend for other page sizes. The kernel is causal only: a step in
    which any chunk has visible ranges is planned and run by an `SdpaAttention` over
    the same pages instead (same [num_pages, page_size, kv_heads, head_dim] layout);
    steps without them keep the flash kernel.
    """

    name = "flash"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func
        self._masked = SdpaAttention(num_heads, num_kv_heads, head_dim, page_size)

    def prepare(self, meta: AttnMetadata) -> dict[str, Any] | SdpaPlan:
        if meta.masked:
            return self._masked.prepare(meta)
        cu_k = torch.zeros(len(meta.context_lens) + 1, dtype=torch.int32)
        cu_k[1:] = torch.tensor(meta.context_lens).cumsum(0)
        return {
            "cu_seqlens_q": meta.cu_seqlens_q,
            "cu_seqlens_k": cu_k.to(meta.cu_seqlens_q.device),
            "max_seqlen_q": meta.max_query_len,
            "max_seqlen_k": meta.max_context_len,
            "block_table": meta.block_table,
        }

    def graph_plan(
        self,
        tables: torch.Tensor,
        starts: torch.Tensor,
        context_lens: torch.Tensor,
        cu_keys: torch.Tensor,
        max_context: int,
    ) -> dict[str, Any]:
        """A decode plan over buffers a CUDA graph reads (engine/cuda_graphs.py): the
        key bound fixed at the largest context."""
        return {
            "cu_seqlens_q": starts,
            "cu_seqlens_k": cu_keys,
            "max_seqlen_q": 1,
            "max_seqlen_k": max_context,
            "block_table": tables,
        }

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: dict[str, Any] | SdpaPlan,
    ) -> torch.Tensor:
        if isinstance(plan, SdpaPlan):
            return self._masked(q, k_cache, v_cache, plan)
        return self._varlen(q, k_cache, v_cache, causal=True, **plan)


FLASH_PAGE_SIZE = 256  # flash-attn's paged KV wants a multiple of 256 tokens a page
PAGE_SIZE = 16  # every other backend's


def _flash_problem(device: str, page_size: int) -> str | None:
    if not device.startswith("cuda"):
        return "needs CUDA"
    if not flash_attn_available():
        return "needs the flash_attn package"
    if page_size and page_size % FLASH_PAGE_SIZE:
        return f"needs a page size that is a multiple of {FLASH_PAGE_SIZE}, not {page_size}"
    return None


def _triton_problem(device: str, page_size: int) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the triton package (pip install '.[gpu]')"
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return "runs on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1)"
    from symphony.engine.triton_attention import MIN_PAGE_SIZE

    if page_size and page_size < MIN_PAGE_SIZE:
        return f"needs pages of at least {MIN_PAGE_SIZE} tokens, not {page_size}"
    return None


def choose_attention(choice: str, device: str, page_size: int = 0) -> tuple[str, int]:
    """The backend ("flash", "triton" or "sdpa") and page size a `choice` runs with.

    `page_size` 0 takes the backend's own (256 for flash, else 16). "auto" on CUDA takes
    flash, else triton, else SDPA over gathered pages, and logs one line saying why it
    fell back; on a CPU it is SDPA (with the compiled kernels' attention for decodes and
    short chunks). A backend asked
    for by name that cannot run raises ValueError saying why.
    """
    if choice in ("flash", "triton"):
        problem = (_flash_problem if choice == "flash" else _triton_problem)(device, page_size)
        if problem is not None:
            raise ValueError(f"the {choice} attention backend {problem}")
        return choice, page_size or (FLASH_PAGE_SIZE if choice == "flash" else PAGE_SIZE)
    if choice == "sdpa" or not device.startswith("cuda"):
        return "sdpa", page_size or PAGE_SIZE
    flash = _flash_problem(device, page_size)
    if flash is None:
        return "flash", page_size or FLASH_PAGE_SIZE
    triton = _triton_problem(device, page_size)
    if triton is None:
        log.warning("attention: triton (flash %s)", flash)
        return "triton", page_size or PAGE_SIZE
    log.warning("attention: sdpa over gathered pages (flash %s; triton %s)", flash, triton)
    return "sdpa", page_size or PAGE_SIZE


def make_attention(
    name: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    kernels: ModuleType | None = None,
) -> AttentionBackend:
    """The backend `name` chosen by `choose_attention`, for pages of `page_size`.

    `kernels`: the compiled CPU kernels, for SDPA's decodes and short chunks on a CPU.
    """
    if name == "flash":
        return FlashAttention(num_heads, num_kv_heads, head_dim, page_size)
    if name == "triton":  # imported only here: triton.jit reads TRITON_INTERPRET then
        from symphony.engine.triton_attention import TritonAttention

        return TritonAttention(num_heads, num_kv_heads, head_dim, page_size)
    return SdpaAttention(num_heads, num_kv_heads, head_dim, page_size, kernels)
