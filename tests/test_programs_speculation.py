"""The speculation group of the program library on the tiny model: prompt lookup + verify
and Jacobi decoding make exactly plain greedy generation's tokens, in fewer calls than
tokens when the guesses are good, and leave no file behind."""

from __future__ import annotations

import sys

from symphony.lipctl.aio import AsyncLip, connect
from tests.program_helpers import load_example
from tests.server_helpers import ROOT

A = ord("a")  # a byte token of the tiny vocabulary


async def greedy(lip: AsyncLip, prompt: list[int], max_tokens: int, **sampler: object) -> list[int]:
    """Plain greedy generate of `prompt` on a file of its own."""
    kv = await lip.kv("reference.kv", create=True)
    try:
        await kv.append(prompt)
        return (await kv.generate(max_tokens=max_tokens, temperature=0.0, **sampler)).token_ids
    finally:
        await kv.unlink()


async def test_prompt_lookup_equals_greedy_in_fewer_calls(tiny_socket: str) -> None:
    speculative = load_example("speculative")
    async with connect(tiny_socket) as lip:
        result = await speculative.run(lip, max_tokens=64)
        prompt = await speculative.chat_prompt(lip, speculative.REQUEST, speculative.TEXT)
        assert result["token_ids"] == await greedy(lip, prompt, 64)
        assert result["output"] == await lip.detokenize(result["token_ids"], skip_special=True)
        # the random model falls into loops, which lookup in its own output drafts
        assert result["verify_calls"] + result["forward_calls"] < len(result["token_ids"])
        assert result["quality"] > 1
        assert await lip.listdir("speculative") == []


async def test_prompt_lookup_copies_in_long_accepted_drafts(tiny_socket: str) -> None:
    speculative = load_example("speculative")
    bias = {A: 100.0}  # the model says "aaaa...", the text it is given
    async with connect(tiny_socket) as lip:
        result = await speculative.run(lip, text="a" * 40, max_tokens=48, logit_bias=bias)
        prompt = await speculative.chat_prompt(lip, speculative.REQUEST, "a" * 40)
        assert result["token_ids"] == await greedy(lip, prompt, 48, logit_bias=bias)
        assert result["token_ids"] == [A] * 48
        assert result["verify_calls"] + result["forward_calls"] <= 4  # 16-token drafts
        assert await lip.listdir("speculative") == []


async def test_jacobi_equals_greedy(tiny_socket: str) -> None:
    jacobi = load_example("jacobi_decoding")
    async with connect(tiny_socket) as lip:
        prompt = await lip.apply_chat_template([{"role": "user", "content": jacobi.QUESTION}])
        reference = await greedy(lip, prompt, 40)
        for window, pool in ((1, False), (4, False), (2, True)):
            result = await jacobi.run(lip, max_tokens=40, window=window, pool=pool)
            assert result["token_ids"] == reference, (window, pool)
            # every verify gains a token at least
            assert result["verify_calls"] <= len(result["token_ids"])
            if not pool:
                assert result["pool_drafts"] == 0
        assert await lip.listdir("jacobi_decoding") == []


async def test_jacobi_accepts_a_window_of_right_guesses(tiny_socket: str) -> None:
    jacobi = load_example("jacobi_decoding")
    bias = {A: 100.0}  # every prediction is "a", whatever came before: guesses converge
    async with connect(tiny_socket) as lip:
        result = await jacobi.run(lip, max_tokens=40, window=4, pool=False, logit_bias=bias)
        prompt = await lip.apply_chat_template([{"role": "user", "content": jacobi.QUESTION}])
        assert result["token_ids"] == await greedy(lip, prompt, 40, logit_bias=bias)
        # the first verify finds the guesses wrong, then every one takes 5 tokens
        assert result["verify_calls"] == 1 + (40 - 1 + 4) // 5
        assert result["jacobi_accepted"] == 40 - result["verify_calls"]  # the rest guessed
        assert await lip.listdir("jacobi_decoding") == []


async def test_jacobi_drafts_from_the_pool_where_the_text_repeats(tiny_socket: str) -> None:
    jacobi = load_example("jacobi_decoding")
    bias = {A: 100.0}
    question = "a" * 40  # the prompt holds the output-to-be: pool drafts of 16 are right
    async with connect(tiny_socket) as lip:
        result = await jacobi.run(lip, question, max_tokens=48, window=2, logit_bias=bias)
        prompt = await lip.apply_chat_template([{"role": "user", "content": question}])
        assert result["token_ids"] == await greedy(lip, prompt, 48, logit_bias=bias) == [A] * 48
        # a 2-token Jacobi verify first (the tail "<|im_start|>assistant\n" is new), then
        # 17 tokens a verify; the window alone takes 3 a verify
        assert result["verify_calls"] <= 5
        assert result["pool_drafts"] >= result["verify_calls"] - 2
        assert await lip.listdir("jacobi_decoding") == []


async def test_both_end_at_the_stop_token_as_generate_does(tiny_socket: str) -> None:
    speculative, jacobi = load_example("speculative"), load_example("jacobi_decoding")
    async with connect(tiny_socket) as lip:
        (end,) = await lip.tokenize("<|im_end|>")
        bias = {end: 4.0}  # the turn ends at once (milder biases never end it on this model)
        spec = await speculative.run(lip, max_tokens=32, logit_bias=bias)
        prompt = await speculative.chat_prompt(lip, speculative.REQUEST, speculative.TEXT)
        reference = await greedy(lip, prompt, 32, logit_bias=bias)
        assert reference == [end]
        assert spec["token_ids"] == reference
        by_jacobi = await jacobi.run(lip, max_tokens=32, logit_bias=bias)
        prompt = await lip.apply_chat_template([{"role": "user", "content": jacobi.QUESTION}])
        assert by_jacobi["token_ids"] == await greedy(lip, prompt, 32, logit_bias=bias)


async def test_bench_rows_run(tiny_socket: str) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from programs_speculation import ROWS

    async with connect(tiny_socket) as lip:
        for row in ROWS:
            by_lip, by_prompts = await row.lip(lip), await row.prompts(lip)
            assert "output" in by_lip and "output" in by_prompts
            if row.same_output:
                assert [by_lip.get(k) for k in row.same_keys] == [
                    by_prompts.get(k) for k in row.same_keys
                ]
                assert by_lip["token_ids"] == by_prompts["token_ids"], row.program
            if row.quality:
                assert isinstance(by_lip["quality"], float)
        assert await lip.listdir("prompt-serving") == []
