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
from tests.mount_helpers import needs_fuse
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


@needs_fuse
async def test_read_gives_a_kv_files_text_through_the_mount(mounted) -> None:
    mount, socket = mounted
    view = os.path.join(mount, ".sys", "text")  # what the LIP reads by default there
    async with connect(socket) as lip:
        await lip.mkdir("notes", parents=True)
        kv = await lip.kv("notes/prices.kv", create=True)
        ids = await lip.tokenize(react.DEMO_TEXT)
        await kv.append(ids)
        assert react.read_file(view, "notes/prices.kv") == await lip.detokenize(ids)
        for bad in ("notes/missing.kv", "notes", "../status", "/notes/prices.kv"):
            with pytest.raises(react.ToolError):
                react.read_file(view, bad)
        await kv.unlink()


async def test_python_prints_and_is_bounded_in_time_memory_and_output() -> None:
    assert await react.run_python("print(sum([1, 2, 3]))") == "6"
    assert len(await react.run_python("print('x' * 10000)")) <= 4 * react.OBSERVATION_CHARS
    looser = {**react.LIMITS, "CPU": 30}  # so the wall clock, not RLIMIT_CPU, stops it
    failures = {
        "while True: pass": (("stopped after",), looser),  # the wall clock
        # the wall clock or RLIMIT_CPU, whichever first
        "x = 0\nwhile True: x += 1": (("stopped after", "killed by SIGXCPU"), react.LIMITS),
        "x = [0] * (1 << 30)": (("MemoryError",), react.LIMITS),  # RLIMIT_AS
        "1/0": (("ZeroDivisionError",), react.LIMITS),
        # the error, not the output before it, is what the model reads
        "print(1)\n1/0": (("ZeroDivisionError",), react.LIMITS),
        "print('x' * 5000)\n1/0": (("ZeroDivisionError",), react.LIMITS),
    }
    errors: dict[str, str] = {}

    async def fail(code: str, limits: dict[str, int]) -> None:
        with pytest.raises(react.ToolError) as caught:
            await react.run_python(code, limits=limits)
        errors[code] = str(caught.value)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for code, (_, limits) in failures.items():
            nursery.start_soon(fail, code, limits)
    assert time.monotonic() - started < 6
    for code, (words, _) in failures.items():
        assert any(w in errors[code] for w in words), (code, errors[code])


async def test_python_runs_the_language_subset_and_refuses_the_ways_out(tmp_path: Path) -> None:
    allowed = {
        "print(sorted({3: 'a', 1: 'b'}.items()))": "[(1, 'b'), (3, 'a')]",
        "print(math.sqrt(16), f'{2 ** 10:,}', ' '.join(str(i * i) for i in range(4)))": (
            "4.0 1,024 0 1 4 9"
        ),
        "def f(n): return 1 if n < 2 else n * f(n - 1)\nprint(f(5))": "120",
        "import math\nprint([0 for _ in range(2)], format(math.pi, '.2f'))": "[0, 0] 3.14",
        "try:\n    [][1]\nexcept IndexError as e:\n    print('caught', e)": (
            "caught list index out of range"
        ),
    }
    for code, printed in allowed.items():
        assert await react.run_python(code) == printed
    marker = tmp_path / "escaped"
    write = f"write_text({str(marker)!r}, 'x')"
    refused = {
        "import os": "import is not allowed",
        "from os import system": "import is not allowed",
        f"__import__('pathlib').Path.{write}": "is not allowed",
        f"f = open({str(marker)!r}, 'w')": "name 'open' is not defined",
        "().__class__.__base__.__subclasses__()": ".__subclasses__ is not allowed",
        "print('{0.__class__}'.format(1))": ".format is not allowed",
        "print('{x.__class__}'.format_map({'x': 1}))": ".format_map is not allowed",
        "g = (x for x in [1])\nprint(g.gi_frame)": ".gi_frame is not allowed",
        "getattr(1, '__class__')": "name 'getattr' is not defined",
        "exec('import os')": "name 'exec' is not defined",
        "eval('1')": "name 'eval' is not defined",
        "type(1)": "name 'type' is not defined",
        "class A: pass": "class is not allowed",
        "match 'x':\n    case str(format=f): print(f)": "match is not allowed",
        "def g(): yield 1": "yield is not allowed",
        "try:\n    1/0\nexcept Exception as e:\n    print(e.__traceback__)": "__traceback__",
        "_x = 1": "_x is not allowed",
        "math.pi = 3": "setting or deleting .pi is not allowed",
        "import math, os": "import is not allowed",
        # CPython gh-123378: a negative start reads the memory before the bytes
        "print(str(UnicodeDecodeError('x', b'ab', -1, 0, 'r')))": "not defined",
        "raise ValueError('a\\nb')": "ValueError: a b",  # one line for the model
        "try:\n    b'\\xff'.decode()\nexcept ValueError as e:\n    e.start = -1": (
            "setting or deleting .start is not allowed"
        ),
        "x = '\0'": "cannot run",  # a NUL byte: no argv takes it
    }
    errors: dict[str, str] = {}

    async def refuse(code: str) -> None:
        with pytest.raises(react.ToolError) as caught:
            await react.run_python(code)
        errors[code] = str(caught.value)

    async with trio.open_nursery() as nursery:
        for code in refused:
            nursery.start_soon(refuse, code)
    for code, words in refused.items():
        assert words in errors[code], (code, errors[code])
    assert not marker.exists()


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaped yet has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def test_python_kills_the_grandchildren_its_code_forked(tmp_path: Path) -> None:
    # the sandbox refuses `import os`, and RLIMIT_NPROC (1) the fork: plain Python, no
    # limits, so the fork works and the process group kill is what must end it

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
            assert await react.run_bounded([sys.executable, "-c", code]) == "(nothing printed)"
        except react.ToolError as exc:  # the child itself out of time
            assert child_seconds and "stopped after" in str(exc), exc
        returned = time.monotonic()
        pid = int(started.read_text())
        while not gone(pid):
            assert time.monotonic() - returned < 3, "the grandchild outlived run_bounded"
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
