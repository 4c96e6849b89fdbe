"""Speculative decoding with drafts from the prompt itself (prompt lookup), in one
`verify` call per round, against plain greedy generation: the same text, fewer steps.

    lipctl run examples/speculative.py [MAX_TOKENS]

Each round looks up the last few tokens of the text so far in the prompt and proposes the
tokens that followed them there; `kv.verify` appends the pending token and the draft,
computes them in one engine step, keeps the longest prefix greedy decoding agrees with,
and returns the next token. Copying or editing a given text accepts long drafts.
"""

import sys
import time

from symphony.lipctl import connect

MAX_TOKENS = int(sys.argv[1]) if len(sys.argv) > 1 else 64
DRAFT = 8
TEXT = (
    "The river bends past the old mill, where farmers bring their grain each autumn. "
    "Children race along the bank, and the miller waves from the door as the wheel turns."
)


def lookup(context: list[int], prompt: list[int]) -> list[int]:
    """The tokens that followed the longest recent n-gram (3, 2, 1) where the prompt has it."""
    for n in (3, 2, 1):
        tail = context[-n:]
        for i in range(len(prompt) - n, -1, -1):
            if prompt[i : i + n] == tail and i + n < len(prompt):
                return prompt[i + n : i + n + DRAFT]
    return []


with connect() as lip:
    lip.mkdir("spec", parents=True)
    question = f"Copy this text exactly:\n{TEXT}"
    prompt = lip.apply_chat_template([{"role": "user", "content": question}])
    plain = lip.kv("spec/plain.kv", create=True)
    plain.truncate(0)
    plain.append(prompt)
    t0 = time.perf_counter()
    reference = plain.generate(max_tokens=MAX_TOKENS, temperature=0.0)
    t_plain = time.perf_counter() - t0

    stops = set(lip.tokenize("<|im_end|>")) | set(lip.tokenize("<|endoftext|>"))
    kv = lip.kv("spec/verified.kv", create=True)
    kv.truncate(0)
    kv.append(prompt[:-1])
    pending, out, rounds = [prompt[-1]], [], 0
    t0 = time.perf_counter()
    while len(out) < MAX_TOKENS:
        draft = lookup(prompt + out, prompt) or [0]  # a guess that is rarely right
        result = kv.verify(draft, tokens=pending)
        out += result.token_ids
        pending, rounds = [result.token], rounds + 1
        ended = [i for i, t in enumerate(out) if t in stops]
        if ended:  # generate stops after the first stop token, and so does this
            out = out[: ended[0] + 1]
            break
    t_spec = time.perf_counter() - t0
    out = out[:MAX_TOKENS]
    print(f"plain:       {len(reference.token_ids)} tokens in {t_plain:.2f} s")
    print(f"speculative: {len(out)} tokens in {rounds} verify calls, {t_spec:.2f} s")
    print(f"same tokens: {out == reference.token_ids}")
    print(lip.detokenize(out, skip_special=True))
    plain.unlink()
    kv.unlink()
