"""Rows of bench/programs.py for the programs that steer what the model says: guidance,
best-of-n, a watermark, a few-shot prefix tree, select and a bounded chat, each beside
the same job done by prompt serving (whole prompts, fresh files, nothing forked)."""

from __future__ import annotations

import functools
from typing import Any

import prompt_serving
import trio
from program_rows import Row, example
from programs_search import SOT_CONTEXT

from symphony.lipctl.aio import AsyncLip
from symphony.lipctl.results import GenerateResult

guidance = example("guidance_decoding")
best_of_n = example("best_of_n")
watermark = example("watermark")
few_shot_tree = example("few_shot_tree")
select_choice = example("select_choice")
attention_sink_chat = example("attention_sink_chat")

# 1. classifier-free guidance: two whole prompts a token, at once --------------------

GUIDANCE: dict[str, Any] = {
    "question": "Tell me about the moon.",
    "guide": "Answer like a pirate.",
    "gamma": 1.5,
    "max_tokens": 32,
}


async def guidance_prompts(lip: AsyncLip, top_k: int = 20) -> dict[str, Any]:
    cond_ids, uncond_ids = await guidance.contexts(lip, GUIDANCE["question"], GUIDANCE["guide"])
    stops = await guidance.end_of_turn_ids(lip)
    generated: list[int] = []
    tops: list[list[tuple[int, float]]] = [[], []]

    async def ask(i: int, prompt: list[int]) -> None:
        tops[i] = await prompt_serving.next_top_k(lip, prompt + generated, top_k)

    for _ in range(GUIDANCE["max_tokens"]):
        async with trio.open_nursery() as nursery:  # both whole prompts at once
            nursery.start_soon(ask, 0, cond_ids)
            nursery.start_soon(ask, 1, uncond_ids)
        token = guidance.guided_pick(tops[0], tops[1], GUIDANCE["gamma"])
        if token in stops:
            break
        generated.append(token)
    return {"output": await lip.detokenize(generated), "token_ids": generated}


# 2. best-of-n: n whole-prompt samples, then n whole-prompt scorings ------------------

PARAGRAPH = (
    "The Great Barrier Reef, off the coast of Queensland, is the world's largest coral "
    "reef system: nearly three thousand individual reefs and nine hundred islands over "
    "some 344,000 square kilometres. It is built by billions of tiny organisms, coral "
    "polyps, and supports a wide diversity of life, from fish and turtles to whales. "
    "Warmer seas have caused mass coral bleaching several times since 1998, and runoff "
    "from farms and outbreaks of crown-of-thorns starfish add to the pressure on it."
)
# a document (about 900 tokens) and 8 candidate summaries: best-of-n as it is used, where
# the prompt is long and the answers are short
BEST_OF_N: dict[str, Any] = {
    "question": f"{SOT_CONTEXT}\n\nSummarize the text above in one sentence.",
    "n": 8,
    "max_tokens": 32,
}


async def best_of_n_prompts(lip: AsyncLip, temperature: float = 0.8) -> dict[str, Any]:
    n = BEST_OF_N["n"]
    prompt_ids, judge_ids = await best_of_n.prompts(lip, BEST_OF_N["question"])
    samples: list[GenerateResult | None] = [None] * n
    sums = [0.0] * n

    async def draw(i: int) -> None:
        samples[i] = await prompt_serving.generate(
            lip,
            prompt_ids,
            max_tokens=BEST_OF_N["max_tokens"],
            temperature=temperature,
            seed=best_of_n.SEED + i,
        )

    async def judge(i: int, answer: list[int]) -> None:
        sums[i] = await prompt_serving.logprob(lip, judge_ids, answer)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(draw, i)
    drawn = [s for s in samples if s is not None]
    async with trio.open_nursery() as nursery:
        for i, sample in enumerate(drawn):
            nursery.start_soon(judge, i, sample.token_ids)
    scores = [total / len(s.token_ids) for total, s in zip(sums, drawn, strict=True)]
    best = max(range(n), key=scores.__getitem__)
    samples = [s.text for s in drawn]
    return {
        "output": drawn[best].text,
        "samples": samples,
        "scores": scores,
        "quality": scores[best],
    }


# 3. the watermark: a whole prompt per token, with the green list's logit_bias -------

WATERMARK: dict[str, Any] = {
    "prompt": "Write a short story about a lighthouse keeper.",
    "max_tokens": 48,
    "delta": 2.0,
}


async def watermark_prompts(lip: AsyncLip, fraction: float = 0.5) -> dict[str, Any]:
    vocab_size = int(lip.info["model"]["vocab_size"])
    delta, max_tokens = WATERMARK["delta"], WATERMARK["max_tokens"]
    prompt_ids = await lip.apply_chat_template([{"role": "user", "content": WATERMARK["prompt"]}])
    stops = await watermark.end_of_turn_ids(lip)
    generated: list[int] = []
    plain: list[GenerateResult] = []

    async def unmarked() -> None:  # the comparison the program makes too
        args = dict(max_tokens=max_tokens, temperature=0.0)
        plain.append(await prompt_serving.generate(lip, prompt_ids, **args))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unmarked)
        for _ in range(max_tokens):
            context = prompt_ids + generated
            bias = watermark.green_bias(context[-1], vocab_size, delta, fraction)
            result = await prompt_serving.generate(
                lip, context, max_tokens=1, temperature=0.0, logit_bias=bias
            )
            if result.token_ids[0] in stops:
                break
            generated.append(result.token_ids[0])
    plain_ids = [t for t in plain[0].token_ids if t not in stops]
    return {
        "output": await lip.detokenize(generated),
        "quality": watermark.z_score([prompt_ids[-1], *generated], vocab_size, fraction),
        "plain_z": watermark.z_score([prompt_ids[-1], *plain_ids], vocab_size, fraction),
    }


# 4. the few-shot tree: every question a whole prompt --------------------------------

FEW_SHOT: dict[str, Any] = {"per_category": 4, "max_tokens": 6}


async def few_shot_prompts(lip: AsyncLip) -> dict[str, Any]:
    root, categories, questions = await few_shot_tree.tree_tokens(lip, FEW_SHOT["per_category"])
    answers = [""] * len(questions)

    async def answer(i: int, category: str, question: list[int]) -> None:
        prompt = root + categories[category] + question
        args = dict(max_tokens=FEW_SHOT["max_tokens"], stop=["\n"], temperature=0.0)
        answers[i] = (await prompt_serving.generate(lip, prompt, **args)).text

    async with trio.open_nursery() as nursery:
        for i, (category, question, _) in enumerate(questions):
            nursery.start_soon(answer, i, category, question)
    return {"output": answers, "quality": few_shot_tree.accuracy(answers, questions)}


# 5. select over a quiz on one passage: one whole prompt per choice ------------------

PASSAGE = (
    "Marie Curie was born in Warsaw in 1867 and moved to Paris in 1891 to study physics "
    "and mathematics at the Sorbonne. With her husband Pierre she discovered two new "
    "elements, polonium, named after her native Poland, and radium. In 1903 she shared "
    "the Nobel Prize in Physics with Pierre Curie and Henri Becquerel for their work on "
    "radioactivity, and in 1911 she won a second Nobel Prize, in Chemistry, becoming the "
    "first person to win Nobel Prizes in two sciences. She died in 1934 in France."
)
QUIZ = [  # question, choices, the right one
    ("Where was Marie Curie born?", ["in Warsaw", "in Paris", "in London", "in Vienna"], 0),
    ("Which city did she move to in 1891?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
    ("What did she study?", ["law", "medicine", "physics", "music"], 2),
    ("Which element is named after Poland?", ["radium", "uranium", "polonium", "iron"], 2),
    ("In which year did she win her first Nobel Prize?", ["1891", "1903", "1911", "1934"], 1),
    ("Her second Nobel Prize was in", ["Chemistry", "Physics", "Peace", "Literature"], 0),
    ("Who shared the 1903 prize?", ["Pierre Curie", "Albert Einstein", "Isaac Newton"], 0),
    ("Where did she die?", ["in Poland", "in France", "in Italy", "in Spain"], 1),
]


def quiz_question(question: str) -> str:
    return f"{PASSAGE}\n\nQuestion: {question}"


def quiz_result(chosen: list[str]) -> dict[str, Any]:
    right = sum(c == choices[k] for c, (_, choices, k) in zip(chosen, QUIZ, strict=True))
    return {"output": chosen, "quality": right / len(QUIZ)}


async def select_lip(lip: AsyncLip) -> dict[str, Any]:
    chosen = [""] * len(QUIZ)

    async def one(i: int, question: str, choices: list[str]) -> None:
        chosen[i] = (await select_choice.run(lip, quiz_question(question), choices))["output"]

    async with trio.open_nursery() as nursery:
        for i, (question, choices, _) in enumerate(QUIZ):
            nursery.start_soon(one, i, question, choices)
    return quiz_result(chosen)


async def select_prompts(lip: AsyncLip) -> dict[str, Any]:
    means: list[list[float]] = [[0.0] * len(choices) for _, choices, _ in QUIZ]

    async def one(i: int, j: int, prompt: list[int], choice: list[int]) -> None:
        means[i][j] = await prompt_serving.logprob(lip, prompt, choice) / len(choice)

    async with trio.open_nursery() as nursery:
        for i, (question, choices, _) in enumerate(QUIZ):
            prompt = await select_choice.question_ids(lip, quiz_question(question))
            for j, choice in enumerate(choices):
                ids = await select_choice.choice_ids(lip, choice)
                nursery.start_soon(one, i, j, prompt, ids)
    chosen = [
        choices[max(range(len(choices)), key=scores.__getitem__)]
        for (_, choices, _), scores in zip(QUIZ, means, strict=True)
    ]
    return quiz_result(chosen)


# 6. the bounded chat: each turn re-sends the same bounded history ------------------

CHAT: dict[str, Any] = {"turns": 8, "budget": 256, "max_tokens": 24}


async def chat_prompts(lip: AsyncLip) -> dict[str, Any]:
    newline = await lip.tokenize("\n")
    history: list[int] = []  # the tokens the program's file holds, as a list
    answers = []
    for turn in range(CHAT["turns"]):
        sink_ids, user_ids = await attention_sink_chat.turn_ids(lip, turn)
        if turn == 0:
            history = list(sink_ids)
        history += user_ids
        args = dict(max_tokens=CHAT["max_tokens"], temperature=0.0)
        answer = await prompt_serving.generate(lip, history, **args)
        history += answer.token_ids + newline
        start, end = attention_sink_chat.overflow(len(history), len(sink_ids), CHAT["budget"])
        del history[start:end]
        answers.append(answer.text)
    return {"output": answers}


ROWS: list[Row] = [
    Row(
        program="guidance_decoding",
        uses="forward_many (two files a token), outputs top_k",
        lip=functools.partial(guidance.run, **GUIDANCE),
        prompts=guidance_prompts,
        same_output=True,
    ),
    Row(
        program="best_of_n",
        uses="fork, generate (seeded), score",
        lip=functools.partial(best_of_n.run, **BEST_OF_N),
        prompts=best_of_n_prompts,
        quality="the best answer's mean logprob under the judging prompt",
        same_output=True,
        same_keys=("output", "samples"),
    ),
    Row(
        program="watermark",
        uses="forward with a logit_bias of half the vocabulary, fork, generate, tokenize",
        lip=functools.partial(watermark.run, **WATERMARK),
        prompts=watermark_prompts,
        quality="the watermark's z-score of the output",
        same_output=True,
    ),
    Row(
        program="few_shot_tree",
        uses="fork (a two-level prefix tree), generate",
        lip=functools.partial(few_shot_tree.run, **FEW_SHOT),
        prompts=few_shot_prompts,
        quality="share of answers that are right",
        same_output=True,
    ),
    Row(
        program="select_choice",
        uses="score (every choice in one forward), sample",
        lip=select_lip,
        prompts=select_prompts,
        quality="share of the quiz answered right",
        same_output=True,
    ),
    Row(
        program="attention_sink_chat",
        uses="generate, drop (reposition)",
        lip=functools.partial(attention_sink_chat.run, **CHAT),
        prompts=chat_prompts,
    ),
]
