"""A Hugging Face safetensors directory loads and matches transformers' own forward."""

from __future__ import annotations

import json

import pytest
import torch

from symphony.engine.batch import SeqChunk
from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.engine.errors import LoadError
from symphony.engine.model_files import load_model_files
from tests.tiny import CHATML, tiny_tokenizer_json

transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_dir(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"})
    )
    return tmp_path, model


def test_safetensors_dir_matches_transformers(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMPHONY_CACHE", str(tmp_path / "cache"))
    path, model = hf_dir
    engine = Engine(path, EngineConfig(device="cpu", num_pages=32, page_size=8, quant="fp32"))
    ids = list(range(3, 60))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    pages = engine.pool.allocate(engine.pages_for(len(ids)))
    got = engine.step([SeqChunk(ids, 0, pages, num_logits=len(ids))])
    assert (got - ref).abs().max().item() <= 1e-4
    assert engine.tokenizer.eos_token_id == 258
    assert engine.tokenizer.render_chat([{"role": "user", "content": "hi"}], True).endswith(
        "<|im_start|>assistant\n"
    )
    # a second load comes from the weight cache and gives the same model
    cached = load_model_files(path)
    assert cached.fingerprint == engine.fingerprint
    assert (tmp_path / "cache" / engine.fingerprint / "weights.safetensors").exists()


def test_unsupported_model_type(hf_dir):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="unsupported model_type 'gpt2'"):
        load_model_files(path, use_cache=False)


def test_damaged_cache_entry_is_rebuilt(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMPHONY_CACHE", str(tmp_path / "cache"))
    path, _ = hf_dir
    first = load_model_files(path)
    (tmp_path / "cache" / first.fingerprint / "model.json").write_text("{not json")
    again = load_model_files(path)
    assert set(again.weights) == set(first.weights)
