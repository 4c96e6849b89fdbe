"""The agent programs of the library on the tiny model: Graph of Thoughts' merged branches,
the ReAct agent's tools, grammar and rollback, validated output's rollback and retries;
and bench/programs_agents.py's rows in both forms."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import trio

from symphony.lipctl.aio import AsyncLip, connect
from tests.program_helpers import load_example
from tests.server_helpers import ROOT

react = load_example("react_agent")


# Graph of Thoughts ------------------------------------------------------------------


async def test_graph_of_thought_merges_the_branches_sharing_the_first(tiny_socket) -> None:
    got = load_example("graph_of_thought")
    async with connect(tiny_socket) as lip:
        result = await got.run(lip, note_tokens=12, answer_tokens=12)
        assert await lip.listdir("graph_of_thought") == []
    assert len(result["notes"]) == len(got.DOCUMENTS)
    # the merge holds every branch's tokens once, the header only in the first
    assert result["merged_tokens"] == sum(result["piece_tokens"])
    page_size = lip.info["model"]["page_size"]
    assert result["shared_pages"] >= result["piece_tokens"][0] // page_size  # not copied
    assert isinstance(result["output"], str) and 0.0 <= result["quality"] <= 1.0


# ReAct: the tools -------------------------------------------------------------------


def test_calculator_computes_arithmetic_and_nothing_else() -> None:
    assert react.calculate("3 + 5*(7-1)") == "33"
    assert react.calculate("7/2") == "3.5"
    for bad in ("2**10", "__import__('os')", "1/0", "1+", "x"):
        with pytest.raises(react.ToolError):
            react.calculate(bad)


def test_read_stays_inside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.txt").write_text("4 9")
    (tmp_path / "secret.txt").write_text("no")
    (tmp_path / "inside" / "link.txt").symlink_to(tmp_path / "secret.txt")
    root = str(tmp_path / "inside")
    assert react.read_file(root, "a.txt") == "4 9"
    for escape in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "missing.txt", "."):
        with pytest.raises(react.ToolError):
            react.read_file(root, escape)


async def test_python_prints_and_is_bounded_in_time_memory_and_output() -> None:
    assert await react.run_python("print(sum([1, 2, 3]))") == "6"
    assert len(await react.run_python("print('x' * 10000)")) <= 4 * react.OBSERVATION_CHARS
    failures = {
        "import time; time.sleep(30)": "stopped after",  # the wall clock
        "while True: pass": "",  # the wall clock or RLIMIT_CPU, whichever first
        "x = bytearray(1 << 30)": "MemoryError",  # RLIMIT_AS
        "1/0": "ZeroDivisionError",
    }
    errors: dict[str, str] = {}

    async def fail(code: str) -> None:
        with pytest.raises(react.ToolError) as caught:
            await react.run_python(code)
        errors[code] = str(caught.value)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for code in failures:
            nursery.start_soon(fail, code)
    assert time.monotonic() - started < 6
    for code, words in failures.items():
        assert words in errors[code], errors[code]


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaped yet has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def test_python_kills_the_grandchildren_its_code_forked(tmp_path: Path) -> None:
    # RLIMIT_NPROC (1) already refuses the fork to any uid but root: without it the
    # fork works for every uid, and the process group kill is what must end it
    limits = {k: v for k, v in react.LIMITS.items() if k != "NPROC"}

    async def fork_and(child_seconds: int, name: str) -> None:
        started, marker = tmp_path / f"{name}.pid", tmp_path / f"{name}.marker"
        wakes = 1 if child_seconds == 0 else 3  # after the child ends, or its time is up
        code = (
            "import os, time\n"
            "if os.fork() == 0:\n"
            f"    open({str(started)!r} + '.new', 'w').write(str(os.getpid()))\n"
            f"    os.rename({str(started)!r} + '.new', {str(started)!r})\n"
            f"    time.sleep({wakes})\n"
            f"    open({str(marker)!r}, 'w').close()\n"
            "    os._exit(0)\n"
            f"while not os.path.exists({str(started)!r}): time.sleep(0.01)\n"
            f"time.sleep({child_seconds})\n"
        )
        begun = time.monotonic()
        try:
            assert await react.run_python(code, limits=limits) == "(nothing printed)"
        except react.ToolError as exc:  # the child itself out of time
            assert child_seconds and "stopped after" in str(exc), exc
        returned = time.monotonic()
        pid = int(started.read_text())
        while not gone(pid):
            assert time.monotonic() - returned < 3, "the grandchild outlived run_python"
            await trio.sleep(0.01)
        # past the grandchild's sleep: had it lived, it would have left the marker
        await trio.sleep(max(0, begun + wakes + 0.5 - time.monotonic()))
        assert not marker.exists()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fork_and, 0, "exited")  # the child ends at once
        nursery.start_soon(fork_and, 30, "timed_out")  # the child runs past its 2 s


# ReAct: grammar, rollback, files -----------------------------------------------------


async def test_the_action_grammar_lets_only_tool_calls_through(tiny_socket) -> None:
    texts: list[str] = []

    async def sample(lip: AsyncLip, seed: int) -> None:
        kv = await lip.kv(f"react_agent/grammar-{os.getpid()}-{seed}.kv", create=True)
        try:
            await kv.append(await lip.tokenize("Thought: x\nAction:"))
            result = await kv.generate(
                max_tokens=600, grammar=react.GRAMMAR, temperature=1.0, seed=seed
            )
            texts.append(result.text)
        finally:
            await kv.unlink()

    async with connect(tiny_socket) as lip:
        await lip.mkdir("react_agent", parents=True)
        async with trio.open_nursery() as nursery:  # one engine step for all of them
            for seed in range(10):
                nursery.start_soon(sample, lip, seed)
    for text in texts:
        assert react.ACTION.fullmatch(text), text
    assert len({react.ACTION.fullmatch(t)[1] for t in texts}) > 1  # it constrains, not decides


async def test_react_rolls_back_failed_actions_and_removes_its_file(tiny_socket, tmp_path) -> None:
    (tmp_path / react.DEMO_FILE).write_text(react.DEMO_TEXT)
    async with connect(tiny_socket) as lip:
        result = await react.run(lip, root=str(tmp_path), max_steps=3)
        assert await lip.listdir("react_agent") == []
    assert 1 <= len(result["steps"]) <= 3
    for step in result["steps"]:
        assert re.fullmatch(r"(calculator|read|python|finish)\[.*\]", step["action"], re.DOTALL)
    # random weights: most calls fail and are rolled back; the file holds only what stayed
    assert result["retries"] >= 1
    assert result["file_tokens"] == result["tokens"]


# validated output -------------------------------------------------------------------


async def test_validation_rolls_back_to_the_last_good_line(tiny_socket) -> None:
    ov = load_example("output_validation")
    async with connect(tiny_socket) as lip:
        result = await ov.run(lip, count=4, max_retries=2)
        assert await lip.listdir("output_validation") == []
    lines = result["output"].split("\n")
    assert len(lines) == 4 and result["retries"] >= 1
    # every failed try was truncated away: the file is the prompt and the kept lines
    kept = sum(len(ids) for ids in result["line_ids"])
    assert result["file_tokens"] == result["prompt_tokens"] + kept
    valid = sum(ov.check(line, lines[:i]) is None for i, line in enumerate(lines))
    assert result["quality"] == valid / 4
    assert ov.check("2. Spain", ["1. France"]) is None
    assert ov.check("3. Spain", ["1. France", "2. Spain"]) == "already listed"
    assert ov.check("3. Brazil", []) == ov.check("Spainn", []) == "not a country of Europe"


# the bench's rows ------------------------------------------------------------------


async def test_bench_rows_run_in_both_forms(tiny_socket) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from programs_agents import ROWS

    async with connect(tiny_socket) as lip:
        for row in ROWS:
            lip_result = await row.lip(lip)
            prompt_result = await row.prompts(lip)
            assert "output" in lip_result and "output" in prompt_result, row.program
            if row.quality:
                assert 0.0 <= lip_result["quality"] <= 1.0, row.program
                assert 0.0 <= prompt_result["quality"] <= 1.0, row.program
            if row.same_output:
                assert [lip_result.get(k) for k in row.same_keys] == [
                    prompt_result.get(k) for k in row.same_keys
                ]
            assert await lip.listdir(row.program) == []
