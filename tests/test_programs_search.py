"""The search programs on the tiny random-weight model: Tree of Thoughts prunes by
cancelling (the server really stops) and is seeded; Skeleton-of-Thought and
self-consistency share the prompt's pages among their forks, and a seeded chain on a fork
is the chain a fresh file with the same tokens makes; every run leaves no file. Then
bench/programs_search.py's rows, both forms, so the bench cannot rot."""

from __future__ import annotations

import math
import sys

import pytest
import trio

from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.wire import SymphonyError
from tests.program_helpers import load_example
from tests.server_helpers import ROOT, ServerThread
from tests.tiny import tiny_model_files

PAGE_SIZE = 4  # the tiny_socket server's


async def most_shared(lip: AsyncLip, folder: str, done: trio.Event) -> int:
    """The most pages any file in `folder` shared, polled until `done`."""
    most = 0
    while not done.is_set():
        for name in await lip.listdir(folder):
            try:
                stat = await lip.call("kv_stat", path=f"{folder}/{name}")
            except SymphonyError:
                continue  # unlinked meanwhile
            most = max(most, stat["shared_pages"])
        await trio.sleep(0.005)
    return most


async def test_tree_of_thought_is_seeded_and_its_branches_share_pages(tiny_socket) -> None:
    tot = load_example("tree_of_thought")
    args = {"numbers": (2, 3, 4), "target": 10, "branches": 3, "keep": 2, "max_tokens": 8}
    args["floor"] = -math.inf  # nothing pruned as unlikely: the random model's every thought is
    async with connect(tiny_socket) as lip:
        done, shared = trio.Event(), [0]

        async def watch() -> None:
            shared[0] = await most_shared(lip, "tree_of_thought", done)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            first = await tot.run(lip, **args)
            done.set()
        again = await tot.run(lip, **args)
        other = await tot.run(lip, **args, seed=1)
        assert await lip.listdir("tree_of_thought") == []
    prompt_pages = len(tot.puzzle_prompt((2, 3, 4), 10).encode()) // PAGE_SIZE
    assert shared[0] >= prompt_pages  # the branches held the prompt's pages, not copies
    assert len(first["output"].split("\n")) == 2  # two levels, one thought each
    assert first["output"] == again["output"]
    assert first["quality"] == pytest.approx(again["quality"], abs=1e-5)  # batch-level noise
    assert other["output"] != first["output"]
    assert 0.0 <= first["quality"] <= 1.0 and first["pruned_tokens"] == []


async def test_tree_of_thought_prunes_by_cancelling_and_the_server_stops(tiny_socket) -> None:
    tot = load_example("tree_of_thought")
    max_tokens, min_tokens = 64, 3
    async with connect(tiny_socket) as lip:
        before = (await lip.status())["tokens_computed"]
        args = {"branches": 3, "keep": 2, "max_tokens": max_tokens, "min_tokens": min_tokens}
        # floor 0: every thought is unlikely, so every branch is pruned at min_tokens
        result = await tot.run(lip, (2, 3, 4), 10, floor=0.0, **args)
        await trio.sleep(0.3)  # what a generate left running would compute meanwhile
        computed = (await lip.status())["tokens_computed"] - before
        assert await lip.listdir("tree_of_thought") == []
    pruned = result["pruned_tokens"]
    assert len(pruned) == 3 and all(min_tokens - 1 <= n < max_tokens // 4 for n in pruned), pruned
    assert result["output"] == "" and result["quality"] == 0.0  # the search ended at the root
    prompt = len(tot.puzzle_prompt((2, 3, 4), 10).encode())
    assert computed < prompt + 3 * (min_tokens + 4)  # the server stopped, not just the client


async def test_skeleton_of_thought_expands_every_point_on_forks(tiny_socket) -> None:
    sot = load_example("skeleton_of_thought")
    args = {"question": "Why is the sky blue?", "point_tokens": 12, "skeleton_tokens": 600}
    async with connect(tiny_socket) as lip:
        result = await sot.run(lip, **args)
        again = await sot.run(lip, **args)
        assert await lip.listdir("skeleton_of_thought") == []
        prompt = await sot.skeleton_prompt(lip, args["question"])
    assert result["output"] == again["output"]  # greedy
    lines = result["skeleton"].split("\n")[:-1]
    assert 3 <= len(result["points"]) <= 5 and len(lines) == len(result["points"])
    assert all(line.startswith(f"{i}. ") for i, line in enumerate(lines, 1))
    assert result["output"].startswith(f"1. {result['points'][0]}: ")
    assert result["shared_pages"] >= len(prompt) // PAGE_SIZE


async def test_self_consistency_chains_on_forks_are_those_of_fresh_files(tiny_socket) -> None:
    sc = load_example("self_consistency")
    args = {"question": "What is 2 + 3?", "answer": "5", "chains": 4, "shots": 1, "max_tokens": 16}
    async with connect(tiny_socket) as lip:
        result = await sc.run(lip, **args)
        again = await sc.run(lip, **args)
        assert await lip.listdir("self_consistency") == []
        prompt = await lip.tokenize(sc.few_shot_prompt(args["question"], shots=1))
        fresh = []
        for seed in range(2):  # a file of the same tokens, computed afresh, same seeds
            await lip.mkdir("fresh", parents=True)
            kv = await lip.kv(f"fresh/{seed}.kv", create=True)
            await kv.append(prompt)
            chain = await kv.generate(16, stop=sc.STOP, temperature=0.7, seed=seed)
            fresh.append(chain.text)
            await kv.unlink()
    assert result["chains"] == again["chains"]
    assert result["chains"][:2] == fresh
    assert len(set(result["chains"])) > 1  # the seeds differ, and so do the chains
    assert result["shared_pages"] >= len(prompt) // PAGE_SIZE
    assert result["quality"] == float(result["output"] == "5")
    assert sc.final_number("So 4 + 4 = 8. The answer is 8.") == "8"
    assert sc.vote(["The answer is 3.", "it is 4", "The answer is 3"], "3")["output"] == "3"


@pytest.fixture(scope="module")
def rows_socket(tmp_path_factory):
    """A tiny-model server sized for the bench's prompts (byte tokens: about four times the
    real model's), without a prefix cache, as bench/programs.py serves the prompt forms."""
    engine = Engine(
        tiny_model_files(max_position=8192),
        EngineConfig(device="cpu", num_pages=16384, page_size=PAGE_SIZE),
    )
    folder = tmp_path_factory.mktemp("rows")
    thread = ServerThread(engine, str(folder / "s.sock"), prefix_cache=False)
    thread.start()
    yield thread.server.config.socket_path
    thread.stop()
    assert thread.error is None


async def test_bench_rows_run_in_both_forms(rows_socket) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from programs_search import ROWS
    finally:
        sys.path.remove(str(ROOT / "bench"))
    async with connect(rows_socket) as lip:
        for row in ROWS:
            by_lip, by_prompts = await row.lip(lip), await row.prompts(lip)
            assert "output" in by_lip and "output" in by_prompts, row.program
            if row.quality:
                assert isinstance(by_lip["quality"], float), row.program
                assert isinstance(by_prompts["quality"], float), row.program
            if row.same_output:
                assert [by_lip.get(k) for k in row.same_keys] == [
                    by_prompts.get(k) for k in row.same_keys
                ]
            if row.program == "self_consistency":  # the same seeds, the same chains
                assert by_lip["chains"] == by_prompts["chains"]
        for folder in ("tree_of_thought", "skeleton_of_thought", "self_consistency"):
            assert await lip.listdir(folder) == []
