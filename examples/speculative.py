"""Speculative decoding with drafts from the text itself (prompt lookup), one `verify` call
per round: the same tokens as plain greedy generation, in fewer engine steps.

Technique: Prompt Lookup Decoding (Saxena, 2023), the draft-free form of speculative
decoding (Leviathan, Kalman and Matias, 2023, arXiv:2211.17192). Each round looks up the
last few tokens of the text so far earlier in the text (prompt and output) and proposes
the tokens that followed them there. `kv.verify` appends the pending token and the draft,
computes them in one engine step, keeps the longest prefix greedy decoding agrees with
and returns the token after it; copying or editing a given text accepts long drafts.
Drafts come from `symphony.lipctl.drafts.NgramPool`.
Calls: apply_chat_template, tokenize, detokenize, kv.append, kv.verify, kv.forward,
kv.unlink (main also kv.generate, to compare).

    lipctl run examples/speculative.py [MAX_TOKENS]
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

FOLDER = "speculative"
TEXT = (
    "The river bends past the old mill, where farmers bring their grain each autumn. "
    "Children race along the bank, and the miller waves from the door as the wheel turns."
)
REQUEST = "Copy this text exactly."
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")


async def chat_prompt(lip: AsyncLip, request: str, text: str) -> list[int]:
    """The user's turn, `request` then the text it is about, in the model's template."""
    return await lip.apply_chat_template([{"role": "user", "content": f"{request}\n\n{text}"}])


async def stop_ids(lip: AsyncLip) -> set[int]:
    """The end-of-turn tokens the served vocabulary has (those generate stops at)."""
    ids = [await lip.tokenize(name) for name in END_OF_TURN]
    return {one[0] for one in ids if len(one) == 1}


async def run(
    lip: AsyncLip,
    text: str = TEXT,
    request: str = REQUEST,
    max_tokens: int = 64,
    draft_len: int = 16,
    max_ngram: int = 3,
    min_ngram: int = 2,
    logit_bias: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Greedy decoding of the answer to `request` + `text` by prompt lookup + verify
    (under `logit_bias`, if given: then it equals a generate with the same bias).

    Args:
        draft_len: tokens proposed per round at most; on a 2-core CPU a verify of 17
            tokens costs about 3.8 decode steps, and a copy accepts runs of 16.
        max_ngram: the longest tail looked up; longer ones tell apart the places where
            a short phrase recurs.
        min_ngram: the shortest; one-token matches are mostly wrong: a plain decode
            step is cheaper than verifying them.

    Returns:
        "output" (the text), "token_ids", "quality" (mean draft tokens accepted per
        verify call), "verify_calls", "forward_calls" (rounds without a draft).
    """
    prompt = await chat_prompt(lip, request, text)
    greedy: dict[str, Any] = {"temperature": 0.0, "logit_bias": logit_bias or {}}
    stops = await stop_ids(lip)
    await lip.mkdir(FOLDER, parents=True)
    path = f"{FOLDER}/{os.getpid()}-{time.time_ns()}.kv"
    ngrams = NgramPool(max_ngram, min_ngram)  # the prompt and the output so far
    ngrams.extend(prompt)
    out: list[int] = []
    num_verify = num_forward = num_accepted = 0
    try:
        kv = await lip.kv(path, create=True)
        await kv.append(prompt[:-1])
        pending = prompt[-1]  # the latest token, not yet in the file
        while len(out) < max_tokens and not stops & set(out):
            # verify gives accepted + 1 tokens: never ask past max_tokens
            room = max_tokens - len(out) - 1
            draft = ngrams.draft(min(draft_len, room)) if room else []
            if draft:
                verified = await kv.verify(draft, tokens=[pending], **greedy)
                new, num_verify = verified.token_ids, num_verify + 1
                num_accepted += verified.accepted
            else:  # nothing to guess from: one plain decode step
                token = (await kv.forward([pending], **greedy)).token
                assert token is not None  # a sampler field asks for the token after
                new, num_forward = [token], num_forward + 1
            out += new
            ngrams.extend(new)
            pending = new[-1]
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
        "forward_calls": num_forward,
    }


async def compare(max_tokens: int) -> None:
    """The LIP, then one plain greedy generate of the same prompt, side by side."""
    async with connect() as lip:
        t0 = time.perf_counter()
        result = await run(lip, max_tokens=max_tokens)
        spec_s, t0 = time.perf_counter() - t0, time.perf_counter()
        path = f"{FOLDER}/{os.getpid()}-{time.time_ns()}-plain.kv"
        try:
            kv = await lip.kv(path, create=True)
            await kv.append(await chat_prompt(lip, REQUEST, TEXT))
            reference = (await kv.generate(max_tokens=max_tokens, temperature=0.0)).token_ids
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
                await lip.call("kv_unlink", path=path)
        plain_s = time.perf_counter() - t0
    calls = result["verify_calls"] + result["forward_calls"]
    print(f"plain:       {len(reference)} tokens in {plain_s:.2f} s")
    print(f"speculative: {len(result['token_ids'])} tokens in {calls} calls, {spec_s:.2f} s")
    print(f"accepted per verify: {result['quality']:.2f}")
    print(f"same tokens: {result['token_ids'] == reference}")
    print(result["output"])


def main() -> None:
    max_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    trio.run(compare, max_tokens)


if __name__ == "__main__":
    main()
