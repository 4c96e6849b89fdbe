"""Load a Llama-family model from a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from symphony.engine.config import ModelConfig
from symphony.engine.errors import LoadError
from symphony.engine.model_files import ModelFiles, TokenizerInfo

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# Hugging Face name (after "model.layers.N.") -> our name (after "layers.N.")
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q.weight",
    "self_attn.k_proj.weight": "k.weight",
    "self_attn.v_proj.weight": "v.weight",
    "self_attn.q_proj.bias": "q.bias",
    "self_attn.k_proj.bias": "k.bias",
    "self_attn.v_proj.bias": "v.bias",
    "self_attn.o_proj.weight": "o.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "gate.weight",
    "mlp.up_proj.weight": "up.weight",
    "mlp.down_proj.weight": "down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise LoadError(f"not a model directory (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        raise LoadError(f"no .safetensors weights in {path}")
    if not (path / "tokenizer.json").is_file():
        raise LoadError(f"no tokenizer.json in {path}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} does not hold a JSON object")
    return data


def _model_config(cfg: dict[str, Any], names: set[str]) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LoadError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    num_heads = int(cfg["num_attention_heads"])
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise LoadError(f"unsupported rope scaling {scaling!r}")
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings="lm_head.weight" not in names,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in names,
        name=str(cfg.get("_name_or_path") or model_type),
    )


def load_hf_dir(path: Path) -> ModelFiles:
    """Read config.json, every *.safetensors shard and tokenizer.json of `path`.

    Raises:
        LoadError: a file is missing or malformed, or the model is not Llama-family.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_hf_dir(path)
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        try:
            raw.update(load_file(str(shard)))
        except (SafetensorError, OSError) as exc:
            raise LoadError(f"cannot read {shard}: {exc}") from exc
    try:
        config = _model_config(_read_json(path / "config.json"), set(raw))
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(f"bad config.json in {path}: {exc}") from exc

    weights: dict[str, torch.Tensor] = {}
    for name, value in raw.items():
        if name in GLOBAL_TENSORS:
            weights[GLOBAL_TENSORS[name]] = value.float().contiguous()
            continue
        parts = name.split(".", 3)  # model, layers, N, rest
        if len(parts) == 4 and parts[1] == "layers" and parts[3] in LAYER_TENSORS:
            weights[f"layers.{parts[2]}.{LAYER_TENSORS[parts[3]]}"] = value.float().contiguous()

    tok_cfg = {}
    if (path / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(path / "tokenizer_config.json")
    tokenizer_json = (path / "tokenizer.json").read_text()
    vocab = json.loads(tokenizer_json).get("added_tokens", [])
    ids = {t["content"]: t["id"] for t in vocab}

    def special_id(key: str) -> int | None:
        token = tok_cfg.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        return ids.get(token) if isinstance(token, str) else None

    template = tok_cfg.get("chat_template")
    return ModelFiles(
        config=config,
        weights=weights,
        tokenizer=TokenizerInfo(
            tokenizer_json=tokenizer_json,
            chat_template=template if isinstance(template, str) else None,
            bos_token_id=special_id("bos_token"),
            eos_token_id=special_id("eos_token"),
        ),
    )
