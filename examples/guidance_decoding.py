"""Classifier-free guidance: steer a chat model towards an instruction, token by token.

Sanchez et al. 2023, "Stay on topic with Classifier-Free Guidance" (arXiv:2306.17806),
in the contrastive form of Li et al. 2022, "Contrastive Decoding" (arXiv:2210.15097).
Two KV files advance together: the conditional context (the question under a guiding
system instruction) and the unconditional one (the question alone, or under a negative
instruction). Each token is one `lip.forward_many` of both files: it appends the token
picked last to each and asks each for its top-k next tokens (`outputs=[{"top_k": k}]`).
The pick is the best, over the union of both lists, of

    log p_uncond + gamma * (log p_cond - log p_uncond)

(a token missing from one list gets that list's lowest logprob, a bound on its own).
gamma = 1 is the conditional model alone, gamma = 0 the unconditional one, and
gamma > 1 pushes further in the direction the instruction moves the model. Greedy.

    lipctl run examples/guidance_decoding.py [QUESTION] [GUIDE] [GAMMA] [MAX_TOKENS]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.scratch import remove_run

QUESTION = "Tell me about the moon."
GUIDE = "Answer like a pirate."
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


async def end_of_turn_ids(lip: AsyncLip) -> set[int]:
    """The ids that end an assistant turn, as far as the served tokenizer has them."""
    found = [await lip.tokenize(text) for text in END_OF_TURN]
    return {ids[0] for ids in found if len(ids) == 1}


async def contexts(
    lip: AsyncLip, question: str, guide: str, negative: str = ""
) -> tuple[list[int], list[int]]:
    """The conditional and unconditional prompts' token ids."""
    user = {"role": "user", "content": question}
    cond = await lip.apply_chat_template([{"role": "system", "content": guide}, user])
    # no negative: the model's own default system prompt, as an unguided chat would have
    uncond_messages = [{"role": "system", "content": negative}, user] if negative else [user]
    return cond, await lip.apply_chat_template(uncond_messages)


def guided_pick(
    cond_top: Sequence[tuple[int, float]], uncond_top: Sequence[tuple[int, float]], gamma: float
) -> int:
    """The greedy CFG choice from both contexts' top-k (id, logprob) lists."""
    cond, uncond = dict(cond_top), dict(uncond_top)
    cond_floor, uncond_floor = min(cond.values()), min(uncond.values())

    def guided(token: int) -> tuple[float, int]:
        c, u = cond.get(token, cond_floor), uncond.get(token, uncond_floor)
        return u + gamma * (c - u), -token  # ties go to the lower id, in every form

    return max({*cond, *uncond}, key=guided)


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    guide: str = GUIDE,
    negative: str = "",
    gamma: float = 1.5,
    max_tokens: int = 32,
    top_k: int = 20,
) -> dict[str, Any]:
    """Generate an answer to `question` guided by `guide` (away from `negative`)."""
    cond_ids, uncond_ids = await contexts(lip, question, guide, negative)
    stops = await end_of_turn_ids(lip)
    await lip.mkdir("guidance_decoding", parents=True)
    run_id = f"{os.getpid()}-{time.time_ns()}"
    stem = f"guidance_decoding/{run_id}"
    generated: list[int] = []
    try:
        files = [await lip.kv(f"{stem}-{side}.kv", create=True) for side in ("cond", "uncond")]
        pending = [cond_ids, uncond_ids]  # first the prompts, then the token picked last
        for _ in range(max_tokens):
            # both files in one engine step; the top-k after the last token appended
            results = await lip.forward_many(
                [
                    kv.request(tokens, outputs=[{"at": len(tokens) - 1, "top_k": top_k}])
                    for kv, tokens in zip(files, pending, strict=True)
                ]
            )
            cond_top, uncond_top = (r.outputs[0].top_k or [] for r in results)
            token = guided_pick(cond_top, uncond_top, gamma)
            if token in stops:
                break
            generated.append(token)
            pending = [[token], [token]]
    finally:  # whatever happened (a cancel too), no file of this run stays
        await remove_run(lip, "guidance_decoding", run_id)
    return {"output": await lip.detokenize(generated), "token_ids": generated}


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else QUESTION
    guide = sys.argv[2] if len(sys.argv) > 2 else GUIDE
    gamma = float(sys.argv[3]) if len(sys.argv) > 3 else 1.5
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 24

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect() as lip:
            plain = await run(lip, question, guide, gamma=1.0, max_tokens=max_tokens)
            return plain, await run(lip, question, guide, gamma=gamma, max_tokens=max_tokens)

    plain, guided = trio.run(both)
    print(f"gamma 1.0 (the instruction alone): {plain['output'].strip()!r}")
    print(f"guided (gamma {gamma}): {guided['output'].strip()!r}")  # the line tests look for


if __name__ == "__main__":
    main()
