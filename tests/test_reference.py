"""The engine on the real default model against transformers on the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from symphony.engine.batch import SeqChunk
from symphony.engine.generate import generate

pytestmark = pytest.mark.slow

PROMPT = (
    "The history of Paris spans more than two thousand years. It began as a settlement "
    "of the Parisii, a Celtic people, on an island in the Seine around 250 BC. The Romans "
    "conquered the basin in 52 BC and founded a town called Lutetia on the left bank "
    "of the river, which grew into the capital of a kingdom."
)


def test_prompt_tokens_match_transformers(real_engine, hf_reference):
    _, hf_tok = hf_reference
    for text in [PROMPT, "Hello 12345 world!", "naïve café — 東京 🙂", "  two  spaces\n\ttab"]:
        assert real_engine.tokenizer.encode(text) == hf_tok(text).input_ids


def test_chat_template_matches_transformers(real_engine, hf_reference):
    _, hf_tok = hf_reference
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert real_engine.tokenizer.render_chat(messages, add_generation_prompt=True) == expected


def test_logits_match_transformers(real_engine, hf_reference):
    hf_model, _ = hf_reference
    ids = real_engine.tokenizer.encode(PROMPT)
    assert len(ids) >= 64
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    pages = real_engine.pool.allocate(real_engine.pages_for(len(ids)))
    try:
        # computed in two chunks, so the second attends over pages the first wrote
        split = 41
        first = real_engine.step([SeqChunk(ids[:split], 0, pages, num_logits=split)])
        rest = real_engine.step([SeqChunk(ids[split:], split, pages, num_logits=len(ids) - split)])
    finally:
        real_engine.pool.decref(pages)
    ours = torch.cat([first, rest])
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3


def test_greedy_tokens_match_transformers(real_engine, hf_reference):
    hf_model, _ = hf_reference
    ids = real_engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None
        )
    expected = out[0, len(ids) :].tolist()
    assert len(expected) == 32
    assert generate(real_engine, [ids], max_tokens=32)[0] == expected
    assert real_engine.pool.num_used == 0
