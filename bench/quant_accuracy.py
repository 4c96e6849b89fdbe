"""How far each quantized mode strays from fp32, on text no check or calibration saw.

tests/data/heldout_text.txt (2,217 tokens of prose, code, figures and chat): top-1
agreement and mean KL(fp32 || mode) of the next-token distributions at every position;
and tests/data/factual_questions.txt: how many of 20 greedy chat answers (20 tokens)
equal fp32's. A mode with "+bf16kv" keeps its KV pages in bf16 (`--kv-dtype bfloat16`).
Prints a table, writes bench/results/quant_accuracy.json.

    python bench/quant_accuracy.py [--modes int8,w8a8,fp32+bf16kv,int8+bf16kv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import save_results  # bench/common.py

from symphony.engine.config import EngineConfig
from symphony.engine.default_model import default_model_path
from symphony.engine.engine import Engine
from symphony.engine.generate import generate
from symphony.engine.model_files import load_model_files
from symphony.engine.quant_check import compare_logits

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
ANSWER_TOKENS = 20


def measure(engine: Engine, ids: list[int], chats: list[list[int]]) -> tuple[torch.Tensor, list]:
    return engine.prompt_logits(ids), generate(engine, chats, max_tokens=ANSWER_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--modes",
        default="int8,w8a8,fp32+bf16kv,int8+bf16kv",
        help="comma list of --quant modes, each with +bf16kv for bf16 KV pages",
    )
    args = parser.parse_args()
    files = load_model_files(default_model_path())
    config = EngineConfig(device="cpu", num_pages=512, quant="fp32")
    reference = Engine(files, config)
    ids = reference.tokenizer.encode((DATA / "heldout_text.txt").read_text())
    questions = (DATA / "factual_questions.txt").read_text().splitlines()
    template = reference.tokenizer.apply_chat_template
    chats = [template([{"role": "user", "content": q}]) for q in questions]
    ref_logits, ref_answers = measure(reference, ids, chats)
    del reference
    results = {}
    print(f"{len(ids)} held-out tokens, {len(chats)} questions ({ANSWER_TOKENS} tokens each)")
    print(f"{'mode':<14}{'top-1':>8}{'KL':>10}{'answers':>10}")
    for mode in filter(None, args.modes.split(",")):
        quant, _, kv = mode.partition("+")
        kv_dtype = {"": "", "bf16kv": "bfloat16"}[kv]
        config = EngineConfig(device="cpu", num_pages=512, quant=quant, kv_dtype=kv_dtype)
        engine = Engine(files, config)
        logits, answers = measure(engine, ids, chats)
        check = compare_logits(ref_logits, logits)
        same = sum(a == b for a, b in zip(answers, ref_answers, strict=True))
        results[mode] = {"top1": check.top1, "kl": check.kl, "answers_same": same}
        print(f"{mode:<14}{check.top1:>8.4f}{check.kl:>10.5f}{same:>7}/{len(chats)}")
        del engine
    path = save_results("quant_accuracy", results, tokens=len(ids), questions=len(chats))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
