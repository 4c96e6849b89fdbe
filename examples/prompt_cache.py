"""Prompt caching: a long system prompt kept as a KV file that every request forks.

The first run prefills `cache/system.kv`; later runs (and every question) fork it
and compute only the question.

    lipctl run examples/prompt_cache.py "What is a KV cache?" "Name a prime."
"""

import sys
import time

from symphony.lipctl import SymphonyError, connect

SYSTEM = (
    "You are a careful assistant for a library of science books. Answer in one short "
    "sentence. Prefer plain words. If you do not know, say so. Never invent titles. "
) * 8

questions = sys.argv[1:] or ["What is a KV cache?", "Why is the sky blue?"]

with connect() as lip:
    lip.mkdir("cache", parents=True)
    system_turn = {"role": "system", "content": SYSTEM}
    system_ids = lip.apply_chat_template([system_turn], add_generation_prompt=False)
    try:
        system = lip.kv("cache/system.kv")
        print(f"system prompt: reused, {system.stat()['tokens']} tokens")
    except SymphonyError:
        system = lip.kv("cache/system.kv", create=True, mode=0o644)
        t0 = time.perf_counter()
        system.append(system_ids)
        print(
            f"system prompt: computed, {system.stat()['tokens']} tokens "
            f"in {time.perf_counter() - t0:.2f} s"
        )
    for i, question in enumerate(questions):
        # the whole conversation, minus the system turn the cached file already holds
        ids = lip.apply_chat_template([system_turn, {"role": "user", "content": question}])
        assert ids[: len(system_ids)] == system_ids
        q = system.fork(f"cache/q-{time.time_ns()}-{i}.kv")
        t0 = time.perf_counter()
        q.append(ids[len(system_ids) :])
        answer = q.generate(max_tokens=48, temperature=0.0).text
        print(f"Q: {question}\nA: {answer.strip()}  ({time.perf_counter() - t0:.2f} s)")
        q.unlink()
