"""`make demo`: load the embedded default model and answer a chat prompt, with timings."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from symphony.engine.config import QUANT_MODES, EngineConfig
from symphony.engine.errors import EngineError
from symphony.engine.sampling import SamplingParams

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="symphony-demo", description=__doc__)
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: embedded)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--quant", choices=QUANT_MODES, default="none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from symphony.engine.engine import Engine
    from symphony.engine.generate import BatchGenerator, Generation
    from symphony.engine.sampling import make_generator

    try:
        t0 = time.perf_counter()
        engine = Engine(args.model, EngineConfig(quant=args.quant))
        load_s = time.perf_counter() - t0
        params = SamplingParams(temperature=args.temperature, seed=0)
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        gen = Generation(prompt, params, make_generator(0, engine.config.device))
        runner = BatchGenerator(engine)
        runner.run([gen], args.max_tokens)
    except (EngineError, ValueError, OSError) as exc:
        print(f"symphony-demo: {exc}", file=sys.stderr)
        return 1
    s = runner.stats
    reply = engine.tokenizer.decode(gen.output_ids, skip_special=True).strip()
    mc = engine.model_config
    print(
        f"model   {mc.name}: {mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"{engine.config.device} {engine.config.torch_dtype}, quant {engine.config.quant}, "
        f"loaded in {load_s:.1f} s"
    )
    print(f"user    {args.prompt}")
    print(f"reply   {reply}")
    print(f"prefill {s.prefill_tokens} tokens at {s.prefill_tps:.0f} tok/s")
    print(f"decode  {s.decode_tokens} tokens at {s.decode_tps:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
