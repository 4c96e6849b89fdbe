"""Answers from cached document modules, spliced per question (Prompt Cache's modules).

Each document is prefilled once, alone, into a KV file of its own. A question picks the
documents it needs and `kv_concat` splices them after a shared header: whole pages are
shared with the modules and keys are re-rotated to their new positions, so a question
computes only its own tokens. It is an approximation (each module was computed without
the others), good enough when the documents stand on their own.

    lipctl run examples/document_modules.py "Where is the Louvre?" louvre tower
"""

import sys
import time

from symphony.lipctl import SymphonyError, connect

DOCUMENTS = {
    "louvre": "The Louvre is the world's most-visited museum, in Paris, on the Seine.",
    "tower": "The Eiffel Tower was built in 1889 for the World's Fair in Paris.",
    "nile": "The Nile flows north through eleven countries into the Mediterranean Sea.",
    "everest": "Mount Everest, 8,849 metres high, lies on the border of Nepal and China.",
}
question = sys.argv[1] if len(sys.argv) > 1 else "How tall is Mount Everest?"
chosen = sys.argv[2:] or ["everest", "nile"]

with connect() as lip:
    lip.mkdir("modules", parents=True)
    system = {
        "role": "system",
        "content": "You answer questions from the documents below, in one short sentence, "
        "using only what they say. If they do not say, answer that you do not know.",
    }
    header_ids = lip.apply_chat_template([system], add_generation_prompt=False)

    def module(name: str, ids: list[int]):  # type: ignore[no-untyped-def]
        """The module's KV file, prefilled on first use."""
        try:
            return lip.kv(f"modules/{name}.kv")
        except SymphonyError:
            kv = lip.kv(f"modules/{name}.kv", create=True, mode=0o644)
            kv.append(ids)
            return kv

    module("header", header_ids)
    for name in chosen:
        module(name, lip.tokenize(f"Document: {DOCUMENTS[name]}\n"))
    t0 = time.perf_counter()
    q = lip.kv_concat(
        f"modules/q-{time.time_ns()}.kv",
        ["modules/header.kv"] + [f"modules/{n}.kv" for n in chosen],
    )
    spliced = q.stat()
    turn = lip.apply_chat_template([system, {"role": "user", "content": question}])
    q.append(turn[len(header_ids) :])
    answer = q.generate(max_tokens=40, temperature=0.0)
    print(
        f"modules: {', '.join(chosen)} ({spliced['tokens']} tokens spliced, "
        f"{spliced['shared_pages']} pages shared)"
    )
    print(f"Q: {question}\nA: {answer.text.strip()}  ({time.perf_counter() - t0:.2f} s)")
    q.unlink()
