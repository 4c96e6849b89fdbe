"""The OpenAI API against llama.cpp's own server (issue 12): the same client code and
requests against Symphony's OpenAI LIP and `python -m llama_cpp.server`, side by side
in one run, on the same GGUF file (the embedded SmolLM2-135M Q4_1). (Not named
bench/openai.py, as the issue has it: a script of that name would import itself as
`openai`.)

    python bench/openai_server.py [--quick] [--llama-python PATH] [--only symphony]

`--llama-python` is an interpreter with `llama-cpp-python[server]` (a separate venv:
its server's packages are not in Symphony's lock). Prints a table, writes
bench/results/openai.json and openai.png.

- shared prompt: 32 chat requests after one 1,500-token system prompt, 64 tokens each,
  8 at a time: requests/s, and time to first token (TTFT) p50/p99.
- multi-turn: an 8-turn chat, each turn sending the whole history: TTFT of turn 8
  against turn 1.
- n=8: one request for 8 choices against 8 separate requests (8 at a time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from common import RESULTS, save_results  # bench/common.py

from symphony.engine.default_model import default_model_path
from symphony.lipctl.launch import start_server, stop_server

PARAGRAPH = (
    "The archive holds letters, maps and ledgers from the harbour town, sorted by year and "
    "by the family that kept them. Each folder lists who wrote, to whom, and what the "
    "letter asks for: timber, salt, news of a ship, a loan until the harvest comes in. "
)
QUESTIONS = [
    "Which goods does the archive mention?",
    "How are the folders sorted?",
    "What do the letters ask for?",
    "Who kept the ledgers?",
    "What is the archive about?",
    "Name one thing a letter asks for.",
    "What town is this?",
    "Summarise the archive in a sentence.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 300) -> str:
    """The served model's id, once `url` answers /models."""
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=5)
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.models.list().data[0].id
        except openai.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def system_prompt(words: int) -> str:
    text = ""
    while len(text.split()) < words:
        text += PARAGRAPH
    return "You answer questions about this archive, briefly.\n\n" + text


# the model's end tokens (<|endoftext|>, <|im_end|>) never drawn: every answer is as
# long as asked, on both servers, so both do the same work
NO_END = {"0": -100, "2": -100}


def ttft_request(client: openai.OpenAI, model: str, messages: list, **extra: Any) -> dict:
    """One streamed chat request: seconds to its first content, and in all."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0.0, logit_bias=NO_END, **extra
    )
    text = ""
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                text += choice.delta.content
                tokens += 1
    total = time.perf_counter() - t0
    ttft = first if first is not None else total
    return {"ttft": ttft, "total": total, "text": text, "chunks": tokens}


def shared_prompt(url: str, model: str, requests: int, system: str) -> dict:
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    sys_msg = {"role": "system", "content": system}
    ttft_request(client, model, [sys_msg, {"role": "user", "content": "Hello."}], max_tokens=4)

    def one(i: int) -> dict:
        ask = {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}
        return ttft_request(client, model, [sys_msg, ask], max_tokens=64)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in rows)
    return {
        "requests_per_s": requests / seconds,
        "chunks_per_answer": statistics.mean(r["chunks"] for r in rows),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "seconds": seconds,
    }


def multi_turn(url: str, model: str, turns: int, system: str) -> dict:
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    messages: list[dict] = [{"role": "system", "content": system + " (a new chat)"}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        row = ttft_request(client, model, messages, max_tokens=32)
        ttfts.append(row["ttft"])
        messages.append({"role": "assistant", "content": row["text"]})
    return {"ttft": ttfts, "last_over_first": ttfts[-1] / ttfts[0]}


def n_choices(url: str, model: str, n: int, system: str, use_n: bool) -> dict:
    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0, timeout=600)
    messages = [
        {"role": "system", "content": system + " (choices)"},
        {"role": "user", "content": "Write one sentence about the harbour."},
    ]
    t0 = time.perf_counter()
    if use_n:
        client.chat.completions.create(
            model=model,
            messages=messages,
            n=n,
            max_tokens=48,
            temperature=1.0,
            seed=1,
            logit_bias=NO_END,
        )
    else:

        def one(i: int) -> None:
            client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=48,
                temperature=1.0,
                seed=1 + i,
                logit_bias=NO_END,
            )

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))
    return {"seconds": time.perf_counter() - t0}


def run_all(url: str, model: str, quick: bool, use_n: bool) -> dict:
    system = system_prompt(220 if quick else 1100)  # about 300 / 1,500 tokens
    out = {"shared_prompt": shared_prompt(url, model, 8 if quick else 32, system)}
    out["multi_turn"] = multi_turn(url, model, 3 if quick else 8, system)
    out["n8_separate"] = n_choices(url, model, 8, system, use_n=False)
    if use_n:
        out["n8_one_request"] = n_choices(url, model, 8, system, use_n=True)
    return out


def start_llama(python: str, port: int, log: str) -> subprocess.Popen:
    gguf = str(default_model_path())
    argv = [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--n_ctx", "8192", "--n_threads", str(os.cpu_count() or 2)]
    # requests wait their turn: by default a new request interrupts a running stream
    argv += ["--interrupt_requests", "False"]
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(names, [results[n]["shared_prompt"]["requests_per_s"] for n in names])
    a.set_title("32 requests, shared 1,500-token prompt")
    a.set_ylabel("requests/s")
    for n in names:
        b.plot(
            range(1, len(results[n]["multi_turn"]["ttft"]) + 1),
            results[n]["multi_turn"]["ttft"],
            marker="o",
            label=n,
        )
    b.set_title("TTFT per turn of one chat")
    b.set_xlabel("turn")
    b.set_ylabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "openai.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("--only", choices=("symphony", "llama.cpp"))
    options = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="symphony-bench-")
    results: dict[str, dict] = {}
    if options.only in (None, "symphony"):
        port = free_port()
        sock = os.path.join(folder, "s.sock")
        server = start_server(
            sock, "--pages", "8192", "--quant", "int8", "--openai", f"127.0.0.1:{port}"
        )
        try:
            url = f"http://127.0.0.1:{port}/v1"
            results["symphony"] = run_all(url, wait_http(url), options.quick, use_n=True)
        finally:
            stop_server(server)
    if options.only in (None, "llama.cpp"):
        port = free_port()
        llama = start_llama(options.llama_python, port, os.path.join(folder, "llama.log"))
        try:
            url = f"http://127.0.0.1:{port}/v1"
            results["llama.cpp"] = run_all(url, wait_http(url), options.quick, use_n=False)
        finally:
            llama.terminate()
            llama.wait(30)
    shutil.rmtree(folder, ignore_errors=True)
    for name, r in results.items():
        s, m = r["shared_prompt"], r["multi_turn"]
        line = (
            f"{name:10} {s['requests_per_s']:.2f} req/s  TTFT p50 {s['ttft_p50']:.2f} s "
            f"p99 {s['ttft_p99']:.2f} s  turn 8/turn 1 {m['last_over_first']:.2f}  "
            f"8 requests {r['n8_separate']['seconds']:.1f} s  "
            f"({s['chunks_per_answer']:.0f} chunks an answer)"
        )
        if "n8_one_request" in r:
            line += f"  n=8 {r['n8_one_request']['seconds']:.1f} s"
        print(line)
    if len(results) == 2:
        ratio = (
            results["symphony"]["shared_prompt"]["requests_per_s"]
            / results["llama.cpp"]["shared_prompt"]["requests_per_s"]
        )
        print(f"request throughput: {ratio:.2f}x llama.cpp (target >= 2x)")
    if "symphony" in results:
        sym = results["symphony"]
        print(
            f"n=8: {sym['n8_separate']['seconds'] / sym['n8_one_request']['seconds']:.2f}x "
            "8 separate requests (target >= 3x)"
        )
        if "llama.cpp" in results:
            llama = results["llama.cpp"]["n8_separate"]["seconds"]
            print(f"n=8: {llama / sym['n8_one_request']['seconds']:.2f}x llama.cpp's 8 requests")
    plot(results)
    name = "openai" if options.only is None else f"openai-{options.only}"
    print(save_results(name, results, quick=options.quick))


if __name__ == "__main__":
    main()
