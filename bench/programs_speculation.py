"""Bench rows of the speculation group: greedy decoding that checks guessed tokens in one
step, against one plain greedy generate of the whole prompt (prompt serving).

Both rows do the job of bench/steer.py's speculative part, rewriting a paragraph with
three misspellings: prompt lookup drafts from the paragraph itself; Jacobi decoding from
its own previous predictions, or from its n-gram pool (the text so far) where that has
the output's last tokens. Both forms are greedy and must agree token for token.
"""

from __future__ import annotations

import functools
from typing import Any

import prompt_serving
from program_rows import Row, example
from steer import PARAGRAPH

from symphony.lipctl.aio import AsyncLip

REQUEST = "Rewrite the following text, fixing the spelling."
LOOKUP_TOKENS = 192  # most of the ~208-token rewrite


async def rewrite_by_prompt(lip: AsyncLip, max_tokens: int) -> dict[str, Any]:
    """The rewrite as one greedy request: the whole prompt, then generate."""
    prompt = await example("speculative").chat_prompt(lip, REQUEST, PARAGRAPH)
    result = await prompt_serving.generate(lip, prompt, max_tokens=max_tokens, temperature=0.0)
    text = await lip.detokenize(result.token_ids, skip_special=True)
    return {"output": text, "token_ids": result.token_ids}


ROWS: list[Row] = [
    Row(
        program="speculative",
        uses="verify (prompt-lookup drafts), forward",
        lip=functools.partial(
            example("speculative").run,
            text=PARAGRAPH,
            request=REQUEST,
            max_tokens=LOOKUP_TOKENS,
            # on the 2-core CPU a verify of 17 tokens costs 3.8 decode steps, of 9 2.7; the
            # 16-token drafts accept 5.4 on average, and one-token matches mostly fail
            draft_len=16,
            max_ngram=3,
            min_ngram=2,
        ),
        prompts=functools.partial(rewrite_by_prompt, max_tokens=LOOKUP_TOKENS),
        quality="draft tokens accepted per verify",
        same_output=True,
    ),
    Row(
        program="jacobi_decoding",
        uses="verify (Jacobi guesses, ahead=True; n-gram pool drafts)",
        lip=functools.partial(
            example("jacobi_decoding").run,
            question=f"{REQUEST}\n\n{PARAGRAPH}",
            max_tokens=LOOKUP_TOKENS,
            window=2,  # wider windows only cost more here: few Jacobi guesses are right
            draft_len=16,
        ),
        prompts=functools.partial(rewrite_by_prompt, max_tokens=LOOKUP_TOKENS),
        quality="guesses accepted per verify",
        same_output=True,
    ),
]
