"""Grammars and KV edits (issue 11): what a grammar costs a generate, what its forced
tokens give back, and an attention-sink chat's memory and speed over a long run.

Starts `lipctl serve --quant int8` on the embedded model (its fastest decode on a CPU: the
mask is the largest share of a step there), prints a table and writes
bench/results/edits.json.

    python bench/edits.py [--quick]

- mask overhead: greedy generate of N tokens, unconstrained against the regex
  `[a-z ,.]+` (every token a choice under a mask, none forced: the mask's cost alone),
  same N; stop tokens are blocked so both make exactly N.
- JSON: a schema's object (four records of fixed keys) under the grammar, in output
  tokens/s, against unconstrained tokens/s: the keys, quotes and brackets are forced
  and go in with the sampled token, a step for several tokens.
- attention sinks: a chat of 64-token answers whose file keeps its first tokens and
  its newest ones (`kv.drop(..., reposition=True)` past a budget); pages used and
  tokens/s per window of the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from common import save_results  # bench/common.py

from symphony.lipctl import connect
from symphony.lipctl.launch import start_server, stop_server

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
ASK = "List four books as JSON: title, year and genre of each."
BOOKS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 24},
            "year": {"type": "integer", "minimum": 1800, "maximum": 2025},
            "genre": {"enum": ["novel", "poetry", "essay", "drama"]},
            "in_print": {"type": "boolean"},
        },
        "required": ["title", "year", "genre", "in_print"],
        "additionalProperties": False,
    },
    "minItems": 4,
    "maxItems": 4,
}
LETTERS = {"regex": "[a-z ,.]+"}
CHAT = [
    "Tell me about rivers.",
    "What do bees do?",
    "Describe a city at night.",
    "Why do leaves fall?",
    "What is a good breakfast?",
]


def timed(lip, prompt: list[int], name: str, **generate) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Seconds and tokens of one greedy generate on a fresh copy of the prompt."""
    kv = lip.kv(name, create=True)
    kv.truncate(0)
    kv.append(prompt)
    t0 = time.perf_counter()
    result = lip.call("generate", path=name, **generate)
    seconds = time.perf_counter() - t0
    kv.unlink()
    return seconds, len(result["token_ids"])


def grammar_costs(socket: str, n: int, repeats: int) -> dict[str, float]:
    with connect(socket) as lip:
        prompt = lip.apply_chat_template([SYSTEM, {"role": "user", "content": ASK}])
        stops = sorted({2, 0, *lip.tokenize("<|im_end|>")})
        greedy = {"temperature": 0.0, "blocked": stops}
        timed(lip, prompt, "warm.kv", max_tokens=8, sampler=greedy, grammar=LETTERS)
        free, masked, json_rate, json_tokens = [], [], [], []
        for _ in range(repeats):  # interleaved, so drift hits all three alike
            s, k = timed(lip, prompt, "free.kv", max_tokens=n, sampler=greedy)
            free.append(k / s)
            s, k = timed(lip, prompt, "mask.kv", max_tokens=n, sampler=greedy, grammar=LETTERS)
            masked.append(k / s)
            s, k = timed(
                lip,
                prompt,
                "json.kv",
                max_tokens=400,
                sampler={"temperature": 0.0},
                grammar={"json_schema": BOOKS},
            )
            json_rate.append(k / s)
            json_tokens.append(k)
    free_rate = statistics.median(free)
    return {
        "tokens": n,
        "free_tokens_per_s": free_rate,
        "masked_tokens_per_s": statistics.median(masked),
        "mask_overhead": free_rate / statistics.median(masked) - 1.0,
        "json_tokens": statistics.median(json_tokens),
        "json_tokens_per_s": statistics.median(json_rate),
        "json_over_free": statistics.median(json_rate) / free_rate,
    }


def sink_chat(socket: str, generated: int, budget: int, window: int) -> dict[str, object]:
    with connect(socket) as lip:
        sink_ids = lip.apply_chat_template([SYSTEM], add_generation_prompt=False)
        kv = lip.kv("sinks.kv", create=True)
        kv.truncate(0)
        kv.append(sink_ids)
        newline = lip.tokenize("\n")
        rows, made, turn = [], 0, 0
        t0, at, drops = time.perf_counter(), 0, 0
        while made < generated:
            question = CHAT[turn % len(CHAT)]
            turn += 1
            ids = lip.apply_chat_template([SYSTEM, {"role": "user", "content": question}])
            kv.append(ids[len(sink_ids) :])
            result = kv.generate(max_tokens=64, temperature=0.8, seed=turn)
            kv.append(newline)
            made += len(result.token_ids)
            stat = kv.stat()
            if stat["tokens"] > budget:
                kv.drop(len(sink_ids), stat["tokens"] - budget // 2, reposition=True)
                drops += 1
            if made - at >= window:
                now = time.perf_counter()
                status = lip.status()
                rows.append(
                    {
                        "generated": made,
                        "tokens_per_s": (made - at) / (now - t0),
                        "pages_used": status["pages"]["used"],
                        "file_tokens": kv.stat()["tokens"],
                    }
                )
                t0, at = now, made
                print(f"  {rows[-1]}", flush=True)
        kv.unlink()
    rates = [r["tokens_per_s"] for r in rows]
    pages = [r["pages_used"] for r in rows]
    return {
        "generated": made,
        "budget": budget,
        "drops": drops,
        "windows": rows,
        "tokens_per_s_min_max": [min(rates), max(rates)],
        "pages_used_min_max": [min(pages), max(pages)],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("grammar", "sinks"), help="run one part")
    options = parser.parse_args()
    quick, only = options.quick, options.only
    folder = tempfile.mkdtemp(prefix="symphony-bench-")
    socket = os.path.join(folder, "s.sock")
    server = start_server(socket, "--pages", "4096", "--quant", "int8")
    results: dict[str, dict] = {}
    try:
        if only in (None, "grammar"):
            results["grammar"] = grammar_costs(socket, 48 if quick else 128, 1 if quick else 7)
            print(json.dumps(results["grammar"], indent=1))
        if only in (None, "sinks"):
            generated = 1500 if quick else 20000
            results["sinks"] = sink_chat(socket, generated, 1024, 500 if quick else 2000)
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)
    if "grammar" in results:
        g = results["grammar"]
        print(f"mask overhead        {100 * g['mask_overhead']:+.1f}%  (target <= 10%)")
        print(f"JSON tokens/s        {g['json_over_free']:.2f}x unconstrained  (target >= 1.3x)")
    if "sinks" in results:
        s = results["sinks"]
        print(f"sinks pages used     {s['pages_used_min_max']} over {s['generated']} tokens")
        print(f"sinks tokens/s       {[round(x, 1) for x in s['tokens_per_s_min_max']]}")
    name = "edits" if only is None else f"edits-{only}"
    print(save_results(name, results, quick=quick))


if __name__ == "__main__":
    main()
