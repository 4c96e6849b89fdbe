"""Settings of the model (its geometry) and of the engine (how it is run)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

QUANT_MODES = ("auto", "fp32", "int8", "w8a8")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Geometry of a Llama-family model, as read from GGUF metadata or config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, dtype, page pool and kernels."""

    device: str = field(default_factory=default_device)
    dtype: str = ""  # empty: float32 on CPU, bfloat16 on CUDA
    # what the KV pages hold; empty: the dtype. "bfloat16" under float32 on a CPU halves
    # the pages' memory and the bytes a long context's step reads
    kv_dtype: str = ""
    page_size: int = 0  # tokens a KV page; 0: the attention backend's (choose_attention)
    num_pages: int = 2048  # with page_size 0: pages of 16 tokens' worth, whatever the size
    # "auto": int8 on a CPU where its check passes, else fp32 (engine/quant_check.py);
    # "int8": int8 weight groups, fp32 activations; "w8a8": fbgemm's int8 x int8
    quant: str = "auto"
    attention: str = "auto"  # "auto", "sdpa", "flash" or "triton"
    cuda_graphs: bool = False  # replay decode steps as CUDA graphs (engine/cuda_graphs.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.page_size < 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two (or 0), got {self.page_size}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be at least 2, got {self.num_pages}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")
        if self.quant in ("int8", "w8a8") and not self.device.startswith("cpu"):
            raise ValueError("quantized linear layers run on the CPU only; use --quant fp32")
        if self.quant in ("int8", "w8a8") and self.dtype not in ("", "float32"):
            raise ValueError(f"--quant {self.quant} computes in float32, not {self.dtype}")
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype and self.kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(DTYPES)}, got {self.kv_dtype!r}")
        if self.torch_kv_dtype != self.torch_dtype:
            cpu_fp32 = self.device.startswith("cpu") and self.torch_dtype == torch.float32
            if not (cpu_fp32 and self.torch_kv_dtype == torch.bfloat16):
                raise ValueError(
                    "KV pages differ from the model's dtype only as bfloat16 under float32 on a CPU"
                )
            if self.attention not in ("auto", "sdpa"):
                raise ValueError(
                    f"--attention {self.attention} takes KV pages of the model's dtype"
                )
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError("cuda graphs need a CUDA device")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return DTYPES[self.dtype]
        return torch.float32 if self.device.startswith("cpu") else torch.bfloat16

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_dtype] if self.kv_dtype else self.torch_dtype
