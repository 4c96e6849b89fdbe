"""A tiny random-weight Llama with a byte-level tokenizer, for fast unit tests."""

from __future__ import annotations

import torch

from symphony.engine.config import ModelConfig
from symphony.engine.model_files import ModelFiles, TokenizerInfo
from symphony.engine.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, build_bpe_tokenizer_json

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_config(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = dict(
        vocab_size=256 + len(SPECIALS),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position=2048,
        tie_embeddings=False,
        name="tiny-llama",
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim

    def rand(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    w = {"embed.weight": rand(config.vocab_size, h, scale=1.0), "norm.weight": 1 + rand(h)}
    if not config.tie_embeddings:
        w["lm_head.weight"] = rand(config.vocab_size, h)
    for n in range(config.num_layers):
        p = f"layers.{n}."
        w[p + "attn_norm.weight"] = 1 + rand(h)
        w[p + "ffn_norm.weight"] = 1 + rand(h)
        w[p + "q.weight"] = rand(config.num_heads * d, h)
        w[p + "k.weight"] = rand(config.num_kv_heads * d, h)
        w[p + "v.weight"] = rand(config.num_kv_heads * d, h)
        w[p + "o.weight"] = rand(h, config.num_heads * d)
        w[p + "gate.weight"] = rand(i, h)
        w[p + "up.weight"] = rand(i, h)
        w[p + "down.weight"] = rand(h, i)
        if config.qkv_bias:
            w[p + "q.bias"] = rand(config.num_heads * d)
            w[p + "k.bias"] = rand(config.num_kv_heads * d)
            w[p + "v.bias"] = rand(config.num_kv_heads * d)
    return w


def tiny_tokenizer_json() -> str:
    tokens = byte_tokens() + SPECIALS
    types = [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * len(SPECIALS)
    return build_bpe_tokenizer_json(tokens, [], types, "gpt2")


def tiny_model_files(seed: int = 0, **overrides: object) -> ModelFiles:
    config = tiny_config(**overrides)
    tokenizer = TokenizerInfo(
        tokenizer_json=tiny_tokenizer_json(),
        chat_template=CHATML,
        bos_token_id=256 + SPECIALS.index("<|im_start|>"),
        eos_token_id=256 + SPECIALS.index("<|im_end|>"),
    )
    return ModelFiles(config, tiny_weights(config, seed), tokenizer, fingerprint=f"tiny-{seed}")
