"""Jacobi decoding: guess a window of future tokens, check them all in one forward, keep
the agreed prefix, and take the next guesses from what the model just predicted.

Technique: parallel (Jacobi) decoding of Santilli et al., 2023, "Accelerating Transformer
Inference for Translation via Parallel Decoding" (arXiv:2305.10427), in the sliding-window
form of Lookahead decoding's Jacobi branch (Fu et al., 2024, arXiv:2402.02057). Each
iteration forwards the pending token and `window` guesses, asking the greedy token after
every one of them. A guess is right when it is the token the model predicts after the
ones before it; the first wrong guess is replaced by that prediction (so every iteration
gains at least one token), the file is truncated back to what was accepted, and the
predictions made after the rejected guesses become the next window's guesses: the guess
for position i+1 is what the model predicted there last time. Needs no draft model and
no text to copy; the result is plain greedy decoding's, token for token.
Calls: apply_chat_template, tokenize, detokenize, kv.append, kv.forward(outputs=...),
kv.truncate, kv.unlink (main also kv.generate, to compare).

    lipctl run examples/jacobi_decoding.py [MAX_TOKENS] [WINDOW]
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

FOLDER = "jacobi_decoding"
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
    logit_bias: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Greedy decoding of the answer to `question`, `window` guesses per forward (under
    `logit_bias`, if given: then it equals a generate with the same bias).

    Returns:
        "output" (the text), "token_ids", "quality" (mean guesses accepted per forward)
        and "forward_calls".
    """
    prompt = await lip.apply_chat_template([{"role": "user", "content": question}])
    stops = await stop_ids(lip)
    await lip.mkdir(FOLDER, parents=True)
    path = f"{FOLDER}/{os.getpid()}-{time.time_ns()}.kv"
    out: list[int] = []
    num_forward = num_accepted = 0
    try:
        kv = await lip.kv(path, create=True)
        num_kept = await kv.append(prompt[:-1])
        pending = prompt[-1]  # the latest token, not yet in the file
        guesses = [pending] * window  # any start will do; a repeat is as good as any
        while len(out) < max_tokens and not stops & set(out):
            guesses = guesses[: max(0, max_tokens - len(out) - 1)]
            tokens = [pending, *guesses]
            asks = [{"at": list(range(len(tokens))), "sample": True}]
            result = await kv.forward(
                tokens, outputs=asks, temperature=0.0, logit_bias=logit_bias or {}
            )
            # predicted[i]: the greedy token after tokens[:i + 1]
            by_index = sorted(result.outputs, key=lambda o: o.at)
            predicted = [o.token for o in by_index if o.token is not None]
            accepted = 0
            while accepted < len(guesses) and guesses[accepted] == predicted[accepted]:
                accepted += 1
            out += [*guesses[:accepted], predicted[accepted]]
            num_kept += 1 + accepted  # the pending token and the accepted guesses
            if accepted < len(guesses):  # the rejected guesses' K/V are wrong: drop them
                await kv.truncate(num_kept)
            pending = out[-1]
            # the Jacobi step: next guesses are the predictions past the accepted ones
            guesses = (predicted[accepted + 1 :] + [pending] * window)[:window]
            num_forward, num_accepted = num_forward + 1, num_accepted + accepted
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    # ended after the first stop token, and at max_tokens, as generate ends
    ends = [i + 1 for i, token in enumerate(out) if token in stops]
    token_ids = out[: min([max_tokens, *ends[:1]])]
    return {
        "output": await lip.detokenize(token_ids, skip_special=True),
        "token_ids": token_ids,
        "quality": num_accepted / max(num_forward, 1),
        "forward_calls": num_forward,
    }


async def compare(max_tokens: int, window: int) -> None:
    """The LIP, then one plain greedy generate of the same prompt, side by side."""
    async with connect() as lip:
        t0 = time.perf_counter()
        result = await run(lip, max_tokens=max_tokens, window=window)
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
    print(f"plain:  {len(reference)} tokens in {plain_s:.2f} s")
    num_tokens, num_calls = len(result["token_ids"]), result["forward_calls"]
    print(f"jacobi: {num_tokens} tokens in {num_calls} forwards, {jacobi_s:.2f} s")
    print(f"guesses accepted per forward: {result['quality']:.2f}")
    print(f"same tokens: {result['token_ids'] == reference}")
    print(result["output"])


def main() -> None:
    max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 48
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    trio.run(compare, max_tokens, window)


if __name__ == "__main__":
    main()
