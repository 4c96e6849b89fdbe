"""Read a GGUF file: model geometry, dequantized weights and the tokenizer it carries."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from symphony.engine.config import ModelConfig
from symphony.engine.errors import LoadError
from symphony.engine.model_files import ModelFiles, TokenizerInfo
from symphony.engine.tokenizer import build_bpe_tokenizer_json

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name (after "blk.N.") -> our name (after "layers.N.")
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "q.weight",
    "attn_k.weight": "k.weight",
    "attn_v.weight": "v.weight",
    "attn_q.bias": "q.bias",
    "attn_k.bias": "k.bias",
    "attn_v.bias": "v.bias",
    "attn_output.weight": "o.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "gate.weight",
    "ffn_up.weight": "up.weight",
    "ffn_down.weight": "down.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def check_gguf_header(path: Path) -> None:
    """Raise LoadError unless `path` is a readable file starting with the GGUF magic."""
    if not path.exists():
        raise LoadError(f"model file not found: {path}")
    if not path.is_file():
        raise LoadError(f"model path is not a file: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LoadError(f"not a GGUF file (bad magic {magic!r}): {path}")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation so rotate-half rope applies.

    llama.cpp's converter interleaves the two rotary halves of every head; this puts
    rows back as [head][half][pair] for Hugging Face style rotate-half rope.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _model_config(reader: Any, arch: str) -> ModelConfig:
    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise LoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens)))
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // num_heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        name=str(_field(reader, "general.name", arch)),
    )


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def _tokenizer_info(reader: Any) -> TokenizerInfo:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LoadError(
            f"unsupported tokenizer model {kind!r} in GGUF file; only byte-level BPE "
            "('gpt2') is supported"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = list(_field(reader, "tokenizer.ggml.merges") or [])
    token_types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type") or []]
    pre = str(_field(reader, "tokenizer.ggml.pre", "gpt2"))
    tokenizer_json = build_bpe_tokenizer_json(tokens, merges, token_types, pre)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return TokenizerInfo(
        tokenizer_json=tokenizer_json,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> ModelFiles:
    """Read and dequantize a GGUF model file.

    Raises:
        LoadError: the file is missing, not GGUF, or holds an unsupported model.
    """
    check_gguf_header(path)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the parser fails in many ways on damaged files
        raise LoadError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LoadError(
            f"unsupported architecture {arch!r} in {path.name}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    config = _model_config(reader, arch)
    tokenizer = _tokenizer_info(reader)

    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor"):
        name = _our_name(tensor.name)
        if name is None:
            log.debug("skipping GGUF tensor %s", tensor.name)
            continue
        array = dequantize(tensor.data, tensor.tensor_type)
        value = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        # llama.cpp's converter permutes Llama Q/K rows for its interleaved rope
        # (Qwen2 already uses rotate-half there, and is stored as is).
        if arch == "llama" and name.endswith(".q.weight"):
            value = unpermute_rope(value, config.num_heads)
        elif arch == "llama" and name.endswith(".k.weight"):
            value = unpermute_rope(value, config.num_kv_heads)
        weights[name] = value.to(dtype).contiguous()
    return ModelFiles(config=config, weights=weights, tokenizer=tokenizer)
