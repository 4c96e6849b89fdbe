"""Jacobi decoding with an n-gram pool (lookahead decoding): guess a window of future
tokens, check them all in one verify, keep the agreed prefix, and guess again from what
the model just predicted; where the text so far holds the n-gram the output ends with,
guess what followed it there instead.

Technique: parallel (Jacobi) decoding of Santilli et al., 2023, "Accelerating Transformer
Inference for Translation via Parallel Decoding" (arXiv:2305.10427), with the two
branches of Lookahead decoding (Fu et al., 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding", arXiv:2402.02057). The Jacobi branch: each verify
appends the pending token and the guesses, keeps the longest prefix the model agrees
with, returns the token after it, and (`ahead=True`) the model's prediction after the
rejected guess and after each later one: the next guesses, as in Jacobi iteration, where
the guess for position i+1 is what the model predicted there last time. The n-gram
branch: Lookahead verifies n-grams from a pool; its reference code can fill the pool from
the prompt (`POOL_FROM_PROMPT`), and this pool is the prompt and the output so far, looked
up by the 3 or 2 tokens the output ends with: prompt lookup's drafts (speculative.py).
Lookahead also grows its pool from a 2-D window of Jacobi guesses, W x N tokens a step
(35 and more); on a 2-core CPU a verify of 17 tokens costs about four decode steps, so
that window does not pay and is left out.

Alone, the Jacobi guesses of a small model are right about once in twenty: a window of
guesses then costs more than it saves (run with POOL=0 to see). The pool is what pays
where the output repeats its input or itself. Either way each verify gains at least one
token and the result is plain greedy decoding's, token for token.
Calls: apply_chat_template, tokenize, detokenize, kv.append, kv.verify(ahead=True),
kv.unlink (main also kv.generate, to compare).

    lipctl run examples/jacobi_decoding.py [MAX_TOKENS] [WINDOW] [POOL (1 or 0)]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import trio

from symphony.lipctl import SymphonyError
from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.drafts import NgramPool

FOLDER = "jacobi_decoding"
MAX_DRAFT = 64  # the most guesses one verify takes
QUESTION = "Write the numbers from 1 to 20, separated by commas."
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")


async def stop_ids(lip: AsyncLip) -> set[int]:
    """The end-of-turn tokens the served vocabulary has (those generate stops at)."""
    ids = [await lip.tokenize(name) for name in END_OF_TURN]
    return {one[0] for one in ids if len(one) == 1}


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    max_tokens: int = 64,
    window: int = 4,
    pool: bool = True,
    draft_len: int = 16,
    logit_bias: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Greedy decoding of the answer to `question`, checking `window` Jacobi guesses, or
    a pool draft of up to `draft_len` tokens (`pool`), per verify (under `logit_bias`, if
    given: then it equals a generate with the same bias).

    Returns:
        "output" (the text), "token_ids", "quality" (mean guesses accepted per verify),
        "verify_calls", "pool_drafts" (verifies of a pool draft) and "jacobi_accepted"
        (guesses accepted from the Jacobi window).
    """
    if not (1 <= window <= MAX_DRAFT and 1 <= draft_len <= MAX_DRAFT):
        raise ValueError(f"window and draft_len must be in 1..{MAX_DRAFT} (a verify's draft)")
    prompt = await lip.apply_chat_template([{"role": "user", "content": question}])
    greedy: dict[str, Any] = {"temperature": 0.0, "logit_bias": logit_bias or {}}
    stops = await stop_ids(lip)
    await lip.mkdir(FOLDER, parents=True)
    path = f"{FOLDER}/{os.getpid()}-{time.time_ns()}.kv"
    ngrams = NgramPool()
    ngrams.extend(prompt if pool else [])
    out: list[int] = []
    num_verify = num_pool = num_accepted = jacobi_accepted = 0
    try:
        kv = await lip.kv(path, create=True)
        await kv.append(prompt[:-1])
        pending = prompt[-1]  # the latest token, not yet in the file
        guesses = [pending] * window  # any start will do; a repeat is as good as any
        while len(out) < max_tokens and not stops & set(out):
            room = max(1, max_tokens - len(out) - 1)  # verify gives accepted + 1 tokens
            from_pool = ngrams.draft(min(draft_len, room)) if pool else []
            draft = from_pool or guesses[:room]
            verified = await kv.verify(draft, tokens=[pending], ahead=True, **greedy)
            out += verified.token_ids
            ngrams.extend(verified.token_ids if pool else [])
            pending = verified.token
            # the Jacobi step: the next guesses are the predictions past the accepted ones
            guesses = (verified.ahead + [pending] * window)[:window]
            num_verify, num_accepted = num_verify + 1, num_accepted + verified.accepted
            if from_pool:
                num_pool += 1
            else:
                jacobi_accepted += verified.accepted
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    # ended after the first stop token, and at max_tokens, as generate ends
    ends = [i + 1 for i, token in enumerate(out) if token in stops]
    token_ids = out[: min([max_tokens, *ends[:1]])]
    return {
        "output": await lip.detokenize(token_ids, skip_special=True),
        "token_ids": token_ids,
        "quality": num_accepted / max(num_verify, 1),
        "verify_calls": num_verify,
        "pool_drafts": num_pool,
        "jacobi_accepted": jacobi_accepted,
    }


async def compare(max_tokens: int, window: int, pool: bool) -> None:
    """The LIP, then one plain greedy generate of the same prompt, side by side."""
    async with connect() as lip:
        t0 = time.perf_counter()
        result = await run(lip, max_tokens=max_tokens, window=window, pool=pool)
        jacobi_s, t0 = time.perf_counter() - t0, time.perf_counter()
        path = f"{FOLDER}/{os.getpid()}-{time.time_ns()}-plain.kv"
        try:
            kv = await lip.kv(path, create=True)
            await kv.append(await lip.apply_chat_template([{"role": "user", "content": QUESTION}]))
            reference = (await kv.generate(max_tokens=max_tokens, temperature=0.0)).token_ids
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
                await lip.call("kv_unlink", path=path)
        plain_s = time.perf_counter() - t0
    num_tokens, num_calls = len(result["token_ids"]), result["verify_calls"]
    print(f"plain:  {len(reference)} tokens in {plain_s:.2f} s")
    print(f"jacobi: {num_tokens} tokens in {num_calls} verifies, {jacobi_s:.2f} s")
    print(f"guesses accepted per verify: {result['quality']:.2f}", end=" ")
    print(f"({result['pool_drafts']} pool drafts, {result['jacobi_accepted']} Jacobi guesses kept)")
    print(f"same tokens: {result['token_ids'] == reference}")
    print(result["output"])


def main() -> None:
    max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    pool = sys.argv[3] != "0" if len(sys.argv) > 3 else True
    trio.run(compare, max_tokens, window, pool)


if __name__ == "__main__":
    main()
