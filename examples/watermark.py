"""Watermark generated text with a green list, and detect it with a z-score.

Kirchenbauer et al. 2023, "A Watermark for Large Language Models" (arXiv:2301.10226):
before each token, the vocabulary is split pseudo-randomly, seeded by the previous
token, into a green list (a `fraction` of it) and a red one, and the green tokens' logits
get `delta` more. A detector that knows the key recomputes the lists and counts green
tokens: in unwatermarked text about `fraction` of them are green, so the z-score
(green - fraction T) / sqrt(T fraction (1 - fraction)) over T tokens stays near 0,
while watermarked text scores high.

Each token is one `kv.forward([previous token], temperature=0, logit_bias=green)`: the
bias goes whole to the server (half the vocabulary, 24,576 ids for SmolLM2, fits a
frame easily: requests take maps of up to 262,144 entries) and the greedy pick under it
comes back. A fork of the prompt generates the same answer without the watermark
(`kv.generate`). The detector counts green tokens in a text's ids (`lip.tokenize`).

    lipctl run examples/watermark.py [PROMPT] [MAX_TOKENS] [DELTA]
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.scratch import remove_run

PROMPT = "Write a short story about a lighthouse keeper."
KEY = 15485863  # the paper's hash key (a prime)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


@functools.lru_cache(maxsize=4096)
def green_ids(previous: int, vocab_size: int, fraction: float, key: int = KEY) -> frozenset[int]:
    """The green list that follows token `previous`."""
    rng = random.Random(key * previous)
    return frozenset(rng.sample(range(vocab_size), int(fraction * vocab_size)))


def z_score(token_ids: Sequence[int], vocab_size: int, fraction: float, key: int = KEY) -> float:
    """How far the green tokens of `token_ids` (each but the first, whose list is
    seeded by the one before) are above chance, in standard deviations."""
    scored = len(token_ids) - 1
    if scored < 1:
        return 0.0
    green = sum(
        token in green_ids(previous, vocab_size, fraction, key)
        for previous, token in itertools.pairwise(token_ids)
    )
    return (green - fraction * scored) / math.sqrt(scored * fraction * (1 - fraction))


async def detect(lip: AsyncLip, text: str, fraction: float = 0.5, key: int = KEY) -> float:
    """The watermark's z-score of `text`, as a detector holding only the text gets it."""
    vocab_size = int(lip.info["model"]["vocab_size"])
    return z_score(await lip.tokenize(text), vocab_size, fraction, key)


async def end_of_turn_ids(lip: AsyncLip) -> set[int]:
    """The ids that end an assistant turn, as far as the served tokenizer has them."""
    found = [await lip.tokenize(text) for text in END_OF_TURN]
    return {ids[0] for ids in found if len(ids) == 1}


def green_bias(previous: int, vocab_size: int, delta: float, fraction: float) -> dict[int, float]:
    """The logit_bias of the token after `previous`."""
    return dict.fromkeys(green_ids(previous, vocab_size, fraction), delta)


async def run(
    lip: AsyncLip,
    prompt: str = PROMPT,
    max_tokens: int = 32,
    delta: float = 2.0,
    fraction: float = 0.5,
) -> dict[str, Any]:
    """A watermarked greedy answer to `prompt` and an unwatermarked one, with z-scores."""
    vocab_size = int(lip.info["model"]["vocab_size"])
    prompt_ids = await lip.apply_chat_template([{"role": "user", "content": prompt}])
    stops = await end_of_turn_ids(lip)
    await lip.mkdir("watermark", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    stem = f"watermark/{run_id}"
    generated: list[int] = []
    try:
        marked = await lip.kv(f"{stem}-marked.kv", create=True)
        await marked.append(prompt_ids)
        plain = await marked.fork(f"{stem}-plain.kv")

        async def watermarked() -> None:
            bias = green_bias(prompt_ids[-1], vocab_size, delta, fraction)
            token = await marked.sample(temperature=0.0, logit_bias=bias)
            while token not in stops:
                generated.append(token)
                if len(generated) == max_tokens:
                    break
                bias = green_bias(token, vocab_size, delta, fraction)
                result = await marked.forward([token], temperature=0.0, logit_bias=bias)
                if result.token is None:  # a sampler was given: the server always samples
                    raise RuntimeError("the server answered a forward without a token")
                token = result.token

        async with trio.open_nursery() as nursery:  # the plain answer meanwhile
            nursery.start_soon(watermarked)
            unmarked = await plain.generate(max_tokens=max_tokens, temperature=0.0)
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "watermark", run_id)
    plain_ids = [t for t in unmarked.token_ids if t not in stops]
    return {
        "output": await lip.detokenize(generated),
        "token_ids": generated,
        # from the prompt's last token on: it seeds the first answer token's list
        "quality": z_score([prompt_ids[-1], *generated], vocab_size, fraction),
        "plain": unmarked.text,
        "plain_z": z_score([prompt_ids[-1], *plain_ids], vocab_size, fraction),
    }


def main() -> None:
    prompt = sys.argv[1] if len(sys.argv) > 1 else PROMPT
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    delta = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0

    async def session() -> dict[str, Any]:
        async with connect() as lip:
            result = await run(lip, prompt, max_tokens, delta)
            # what a detector holding only the texts finds (the first token unscored)
            result["text_z"] = [await detect(lip, result[k]) for k in ("output", "plain")]
            return result

    result = trio.run(session)
    print(f"watermarked: {result['output'].strip()!r}")
    print(f"plain:       {result['plain'].strip()!r}")
    # the line tests look for
    print(f"watermarked z: {result['quality']:.2f}, plain z: {result['plain_z']:.2f}")
    print("from the texts alone: z {:.2f} and {:.2f}".format(*result["text_z"]))


if __name__ == "__main__":
    main()
