"""The steering programs of the library (guidance, best-of-n, watermark, few-shot tree,
select, bounded chat) on the tiny model, and both forms of their bench rows."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.lipctl.aio import AsyncLip, connect
from tests.program_helpers import load_example
from tests.server_helpers import ROOT, ServerThread
from tests.tiny import tiny_model_files

if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

import prompt_serving  # bench/, above

Form = Callable[[AsyncLip], Awaitable[dict[str, Any]]]


@pytest.fixture(scope="module")
def tiny_socket(tmp_path_factory):
    """conftest's tiny-model server with a bigger pool (16,384 pages of 4, 32 MiB): the
    bench rows' prompt forms send their whole prompts at once, and a byte tokenizer
    makes a passage of the quiz 600 tokens, 32 times over."""
    engine = Engine(
        tiny_model_files(max_position=8192),  # the bench's document, in byte tokens
        EngineConfig(device="cpu", num_pages=16384, page_size=4),
    )
    thread = ServerThread(engine, str(tmp_path_factory.mktemp("steering") / "s.sock"))
    thread.start()
    yield thread.server.config.socket_path
    thread.stop()
    assert thread.error is None


async def fresh_run(socket: str, form: Form) -> dict[str, Any]:
    """`form` on a connection whose program has no seeded random stream yet: the server
    forgets an outside program once its last connection closes (which it notices a
    moment later), so wait for a row that has computed nothing."""
    for _ in range(200):
        async with connect(socket) as lip:
            rows = [p for p in await lip.ps() if p["pid"] == os.getpid()]
            if all(row["tokens"] == 0 for row in rows):
                return await form(lip)
        await trio.sleep(0.02)
    raise AssertionError("the server kept this program's account")


def without_stop(token_ids: list[int], stops: set[int]) -> list[int]:
    return token_ids[:-1] if token_ids and token_ids[-1] in stops else token_ids


# guidance -------------------------------------------------------------------------


def test_guided_pick_combines_over_both_lists():
    guidance = load_example("guidance_decoding")
    cond = [(1, -0.5), (2, -1.0)]
    uncond = [(2, -0.2), (3, -0.3)]
    assert guidance.guided_pick(cond, uncond, 1.0) == 1  # the conditional model alone
    assert guidance.guided_pick(cond, uncond, 0.0) == 2  # the unconditional one
    # both like 1 best, but the instruction raised 2 most: gamma 2 (2 cond - uncond)
    # gives 1 -0.15 and 2 1.2
    cond, uncond = [(1, -0.1), (2, -0.4)], [(1, -0.05), (2, -2.0)]
    assert guidance.guided_pick(cond, uncond, 1.0) == guidance.guided_pick(cond, uncond, 0.0) == 1
    assert guidance.guided_pick(cond, uncond, 2.0) == 2


async def test_guidance_reduces_to_each_context(tiny_socket):
    guidance = load_example("guidance_decoding")
    async with connect(tiny_socket) as lip:
        cond, uncond = await guidance.contexts(lip, guidance.QUESTION, guidance.GUIDE)
        assert cond != uncond
        stops = await guidance.end_of_turn_ids(lip)
        assert len(stops) == 2  # <|im_end|> and <|endoftext|>
        for gamma, prompt in ((0.0, uncond), (1.0, cond)):
            guided = await guidance.run(lip, gamma=gamma, max_tokens=12)
            plain = await prompt_serving.generate(lip, prompt, max_tokens=12, temperature=0.0)
            assert guided["token_ids"] == without_stop(plain.token_ids, stops), gamma
        strong = await guidance.run(lip, gamma=3.0, max_tokens=12)
        assert strong["output"] == await lip.detokenize(strong["token_ids"])
        assert await lip.listdir("guidance_decoding") == []


# best-of-n ------------------------------------------------------------------------


async def test_best_of_n_returns_the_judges_favourite_and_repeats(tiny_socket):
    best_of_n = load_example("best_of_n")
    bench = load_bench()

    async def small(lip: AsyncLip) -> dict[str, Any]:
        return await best_of_n.run(lip, **bench.BEST_OF_N)

    first = await fresh_run(tiny_socket, small)
    best = max(range(len(first["scores"])), key=first["scores"].__getitem__)
    assert first["output"] == first["samples"][best]
    assert first["quality"] == max(first["scores"])
    assert len(set(first["samples"])) > 1  # each sample has its own seed
    # the same seeds on a fresh program: the same samples, by whole prompts, and the
    # judge's scores those of whole-prompt scoring requests
    again = await fresh_run(tiny_socket, bench.best_of_n_prompts)
    assert again["output"] == first["output"]
    assert again["scores"] == pytest.approx(first["scores"], abs=1e-3)
    async with connect(tiny_socket) as lip:
        assert await lip.listdir("best_of_n") == []


async def test_best_of_n_cancelled_mid_generate_leaves_no_file(tiny_socket):
    """A cancel scope around run() (as a bench or another program may hold) that fires
    while the samples generate: the shielded cleanup still removes every file."""
    best_of_n = load_example("best_of_n")
    n, finished = 3, False
    async with connect(tiny_socket) as lip:
        await lip.mkdir("best_of_n", parents=True)

        async def cancel_mid_generate(scope: trio.CancelScope) -> None:
            while True:  # the prompt, the judge and every fork made, and a sample grown
                names = sorted(await lip.listdir("best_of_n"))
                if len(names) == n + 2:
                    prompt, first = (f"best_of_n/{names[-1]}", f"best_of_n/{names[0]}")
                    sizes = [(await lip.call("kv_stat", path=p))["tokens"] for p in (prompt, first)]
                    if sizes[1] > sizes[0]:
                        break
                await trio.sleep(0.002)
            scope.cancel()

        async def draw(scope: trio.CancelScope) -> None:
            nonlocal finished
            await best_of_n.run(lip, n=n, max_tokens=4000)  # far longer than the wait
            finished = True
            scope.cancel()

        with trio.move_on_after(60) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_mid_generate, scope)
                nursery.start_soon(draw, scope)
        assert scope.cancelled_caught and not finished
        assert await lip.listdir("best_of_n") == []


# watermark ------------------------------------------------------------------------


def test_z_score_counts_green_tokens():
    watermark = load_example("watermark")
    vocab, fraction = 259, 0.5
    marked = [7]
    for _ in range(36):  # always the lowest green id after the one before
        marked.append(min(watermark.green_ids(marked[-1], vocab, fraction)))
    assert watermark.z_score(marked, vocab, fraction) == pytest.approx(6.0)  # sqrt(36)
    reds = [7]
    for _ in range(36):
        reds.append(min(set(range(vocab)) - watermark.green_ids(reds[-1], vocab, fraction)))
    assert watermark.z_score(reds, vocab, fraction) == pytest.approx(-6.0)


async def test_watermark_detected_in_marked_text_only(tiny_socket):
    watermark = load_example("watermark")
    async with connect(tiny_socket) as lip:
        vocab = lip.info["model"]["vocab_size"]
        result = await watermark.run(lip, max_tokens=32, delta=20.0)
        assert len(result["token_ids"]) >= 16
        assert result["quality"] > 4.0  # every biased pick green: about sqrt(32)
        assert abs(result["plain_z"]) < 2.5
        assert result["output"] != result["plain"]
        assert await lip.listdir("watermark") == []
        # the detector from a text alone: letters (which the byte tokenizer gives back as
        # they were, unlike the tiny model's stray bytes) picked green, and plain prose
        marked = [ord("a")]
        for _ in range(30):
            greens = watermark.green_ids(marked[-1], vocab, 0.5)
            marked.append(min(greens & set(range(ord("a"), ord("z") + 1))))
        assert await watermark.detect(lip, await lip.detokenize(marked)) > 4.0
        assert abs(await watermark.detect(lip, watermark.PROMPT * 2)) < 2.5


# few-shot tree --------------------------------------------------------------------


async def test_few_shot_tree_shares_prefixes_and_answers_as_whole_prompts(tiny_socket):
    tree = load_example("few_shot_tree")
    async with connect(tiny_socket) as lip:
        result = await tree.run(lip, per_category=2, max_tokens=4)
        root, categories, questions = await tree.tree_tokens(lip, 2)
        page_size = lip.info["model"]["page_size"]
        # each question's file shares at least the root's and its category's whole pages
        assert result["shared_pages"] >= len(root) // page_size
        assert len(result["output"]) == len(questions) == 2 * len(tree.CATEGORIES)
        for answer, (category, question, _) in zip(result["output"], questions, strict=True):
            prompt = root + categories[category] + question
            whole = await prompt_serving.generate(
                lip, prompt, max_tokens=4, stop=["\n"], temperature=0.0
            )
            assert answer == whole.text
        assert 0.0 <= result["quality"] <= 1.0
        assert await lip.listdir("few_shot_tree") == []
        # a second batch under the same shots: its root comes from the prefix cache
        again = await tree.run(lip, per_category=1, max_tokens=4)
        assert again["root_cached"] == len(root) // page_size * page_size > 0
        assert again["output"] == result["output"][::2]  # the first question of each


# select ---------------------------------------------------------------------------


async def test_select_choice_scores_as_separate_requests(tiny_socket):
    select = load_example("select_choice")
    question, choices = "Which is a fruit?", ["an apple", "a car", "a red cloud"]
    async with connect(tiny_socket) as lip:
        result = await select.run(lip, question, choices)
        prompt = await select.question_ids(lip, question)
        assert result["tokens"] == len(prompt)  # neither score nor sample appended
        means = []
        for choice in choices:
            ids = await select.choice_ids(lip, choice)
            means.append(await prompt_serving.logprob(lip, prompt, ids) / len(ids))
        assert result["scores"] == pytest.approx(means, abs=1e-3)
        assert result["output"] == choices[max(range(3), key=means.__getitem__)]
        assert await lip.listdir("select_choice") == []


# bounded chat ---------------------------------------------------------------------


async def test_attention_sink_chat_stays_bounded(tiny_socket):
    chat = load_example("attention_sink_chat")
    async with connect(tiny_socket) as lip:
        budget = 120
        result = await chat.run(lip, turns=6, budget=budget, max_tokens=16)
        page_size = lip.info["model"]["page_size"]
        assert len(result["output"]) == 6 and result["bounded"]
        assert result["most_pages"] <= math.ceil(budget / page_size) + 1
        # before anything is dropped the chat is a plain one: turn 1 as a whole prompt
        sinks, user = await chat.turn_ids(lip, 0)
        first = await prompt_serving.generate(lip, sinks + user, max_tokens=16, temperature=0.0)
        assert result["output"][0] == first.text
        assert await lip.listdir("attention_sink_chat") == []


# the bench rows -------------------------------------------------------------------


def load_bench() -> Any:
    import programs_steering

    return programs_steering


async def test_bench_rows_run_both_forms(tiny_socket):
    rows = load_bench().ROWS
    assert {row.program for row in rows} == {
        "guidance_decoding",
        "best_of_n",
        "watermark",
        "few_shot_tree",
        "select_choice",
        "attention_sink_chat",
    }
    for row in rows:
        by_program = await fresh_run(tiny_socket, row.lip)
        by_prompts = await fresh_run(tiny_socket, row.prompts)
        assert "output" in by_program and "output" in by_prompts, row.program
        if row.same_output:
            assert [by_program.get(k) for k in row.same_keys] == [
                by_prompts.get(k) for k in row.same_keys
            ]
        if row.quality:
            assert isinstance(by_program["quality"], float), row.program
            assert isinstance(by_prompts["quality"], float), row.program
