"""int8 linear layers stay close to fp32 on the real model."""

from __future__ import annotations

import pytest
import torch

from symphony.engine.batch import SeqChunk
from symphony.engine.config import EngineConfig
from symphony.engine.default_model import default_model_path
from symphony.engine.engine import Engine
from symphony.engine.model_files import load_model_files
from tests.test_reference import PROMPT

pytestmark = pytest.mark.slow


def prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    pages = engine.pool.allocate(engine.pages_for(len(ids)))
    try:
        return engine.step([SeqChunk(ids, 0, pages, num_logits=len(ids))])
    finally:
        engine.pool.decref(pages)


@pytest.mark.parametrize(
    "mode, max_abs, max_kl, min_top1",
    [
        ("int8", 8.0, 0.06, 0.85),  # logits span about +-40
        ("int8wo", 3.0, 0.01, 0.95),
    ],
)
def test_int8_logits_stay_close_to_fp32(real_engine, mode, max_abs, max_kl, min_top1):
    ids = real_engine.tokenizer.encode(PROMPT)
    ref = prompt_logits(real_engine, ids)
    files = load_model_files(default_model_path())
    quantized = Engine(files, EngineConfig(device="cpu", num_pages=64, quant=mode))
    got = prompt_logits(quantized, ids)
    ref_logp, got_logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(-1).mean().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert (got - ref).abs().max().item() <= max_abs
    assert kl <= max_kl
    assert top1 >= min_top1
    # the quantized layers replaced every linear layer
    assert not any(type(m).__name__ == "Linear" for m in quantized.model.modules())
    quantized.pool.check_invariants()
    assert quantized.pool.num_used == 0


def test_int8_answers_the_demo_question(real_engine):
    from symphony.engine.generate import generate

    engine = Engine(
        load_model_files(default_model_path()), EngineConfig(num_pages=64, quant="int8")
    )
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    reply = engine.tokenizer.decode(generate(engine, [ids], max_tokens=12)[0])
    assert "Paris" in reply


def test_quantization_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(device="cuda", quant="int8")
