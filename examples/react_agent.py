"""A ReAct agent: thoughts and tool calls in one KV file that grows, the tools in the LIP.

ReAct (Yao et al. 2022, arXiv:2210.03629) interleaves reasoning and acting: the model
writes a Thought, then an Action (a tool call); the program runs the tool and appends the
Observation, and so on until the action is finish[answer]. The tools run here, next to
the model, so each observation is appended to the context and nothing is prefilled twice.
Each action is generated under a Lark grammar that lets through only the four tool calls;
a call whose tool fails is rolled back (`kv.truncate` to before it) and generated again
with another seed, at most MAX_RETRIES times; then its error is the observation.

Tools: calculator[expr] (+ - * / and parentheses over numbers); read[path] (a text file
under --root: no absolute path, no '..', no link out; by default, on a server with a
mount, the mount's text view of the KV files, so read[notes.kv] gives the text of the
KV file notes.kv where the LIP's user may read it (the kernel checks); without a mount,
the current folder); python[code] (one line, in the small sandboxed
evaluator of symphony/lipctl/python_sandbox.py, its output cut to 500 characters).

The python tool's sandbox has two layers. The language: a subset of Python (no import
but of math, no class, with, global, async or match, no name that starts with '_', an
attribute only of the built-in values or math, never set) with a few builtins (no open,
eval, getattr, type...).
The process: a `python -I` of its own, bounded in time (2 s of wall and CPU time),
memory (256 MiB of address space), processes (RLIMIT_NPROC 1: none new), open files
(32) and output (1 MiB written, 500 characters read), nobody in place of root, in /, in a
session of its own whose process group is killed when it exits or its time is up. What
read[] brings in can still steer the model (prompt injection): the tools are safe to
call, not the answer safe to trust.

Calls: apply_chat_template, tokenize, kv.append, kv.generate(stop=, blocked=, grammar=),
kv.truncate, kv.unlink. `act` runs on anything with append/generate/truncate, so the
bench runs the same loop by prompt serving.

    lipctl run examples/react_agent.py ["QUESTION" [--root DIR]]

Without a question it asks one about a file it makes: a KV file of the prices on a
server with a mount, else a text file in a temporary folder (--root takes a question).
"""

from __future__ import annotations

import ast
import contextlib
import json
import operator
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from symphony.lipctl import SymphonyError, python_sandbox
from symphony.lipctl.aio import AsyncLip, connect
from symphony.lipctl.wire import first_error

SYSTEM = (
    "You answer a question in steps. Each step is a line 'Thought: ...' and a line 'Action: "
    "...', one of: calculator[expression] computes arithmetic; read[path] gives a file's "
    "text; python[code] runs one line of Python and gives what it prints; finish[answer] "
    "ends with the answer. Each action is followed by a line 'Observation: ...'.\n"
    "Example. Question: What is the sum of the numbers in a.txt?\nThought: I read the file."
    "\nAction: read[a.txt]\nObservation: 4 9\nThought: I add them.\nAction: calculator[4+9]"
    "\nObservation: 13\nThought: I know the answer.\nAction: finish[13]"
)
GRAMMAR = {
    "lark": r"""
start: " " (calculator | read | python | finish) "\n"
calculator: "calculator[" /[0-9+\-*\/(). ]{1,60}/ "]"
read: "read[" /[A-Za-z0-9_.\/-]{1,60}/ "]"
python: "python[" /[^\n]{0,120}\]/
finish: "finish[" /[^\]\n]{1,80}/ "]"
"""
}
ACTION = re.compile(r" (calculator|read|python|finish)\[(.*)\]\n", re.DOTALL)
MAX_RETRIES = 2
THOUGHT_TOKENS, ACTION_TOKENS = 32, 48
OBSERVATION_CHARS = 500
DEMO_FILE, DEMO_TEXT = "prices.txt", "apple 3\npear 5\nplum 7\n"
ASK = "Read the file {}, then add the three prices with the calculator."
QUESTION = ASK.format(DEMO_FILE)
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
BINARY[ast.Div] = operator.truediv
UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg}


class ToolError(Exception):
    """A tool call that failed; the message is what the model sees if no retry helps."""


def calculate(expression: str) -> str:
    """+ - * / and parentheses over numbers; nothing else (no names, no powers)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value  # (True and False are ints too: harmless)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            return BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            return UNARY[type(node.op)](value(node.operand))
        raise ValueError("only numbers, + - * / and parentheses")

    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ToolError(f"calculator: {exc}") from None
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def read_file(root: str, path: str) -> str:
    """The text of `path` under `root`; a path that leads out of it is refused."""
    base, relative = Path(root).resolve(), Path(path.strip())
    if relative.is_absolute() or ".." in relative.parts:
        raise ToolError(f"read: {path} is not a path inside the folder")
    try:
        target = (base / relative).resolve()  # a link inside may still point out
        if not target.is_relative_to(base) or not target.is_file():
            raise ToolError(f"read: no file {path} in the folder")
        with target.open("rb") as file:
            return file.read(4 * OBSERVATION_CHARS).decode(errors="replace")
    except OSError as exc:  # not this user's to read, gone since, a mount gone stale
        raise ToolError(f"read: {path}: {exc.strerror or exc}") from None


# the python tool's rlimits (soft = hard): CPU seconds, bytes of address space, bytes a
# file may grow to, open files, and the uid's processes and threads (1: none new)
LIMITS = {"CPU": 2, "AS": 256 << 20, "FSIZE": 1 << 20, "NOFILE": 32, "NPROC": 1}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
        os.killpg(pgid, signal.SIGKILL)


async def run_bounded(argv: list[str], seconds: float = 2.0) -> str:
    """What `argv` prints (stdout and stderr), run in a session of its own with an empty
    environment, from /; ToolError with its last line (or the signal that ended it)
    where it fails, or when out of time."""
    # a file, not a pipe, takes the output: RLIMIT_FSIZE bounds what a loop can print
    with tempfile.TemporaryFile() as out:
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={},
                start_new_session=True,  # its own process group, all of it to kill
            )
        except (OSError, ValueError) as exc:  # a NUL byte in the code, say
            raise ToolError(f"python: cannot run: {exc}") from None
        try:
            with trio.move_on_after(seconds) as timer:
                await process.wait()
        finally:  # out of time, cancelled or exited: the group goes, grandchildren too
            _kill_group(process.pid)
            with trio.CancelScope(shield=True):
                await process.wait()
        if timer.cancelled_caught:
            raise ToolError(f"python: stopped after {seconds} s")
        code, size = process.returncode, out.seek(0, os.SEEK_END)
        if code < 0:  # a crash, or a limit's signal (SIGXCPU, SIGXFSZ)
            raise ToolError(f"python: killed by {signal_name(-code)}")
        out.seek(max(0, size - 4 * OBSERVATION_CHARS) if code else 0)
        text = out.read(4 * OBSERVATION_CHARS).decode(errors="replace").strip()
        if code:  # the error is the last line written (after the output, flushed)
            raise ToolError(f"python: {text.splitlines()[-1] if text else f'exit status {code}'}")
        return text or "(nothing printed)"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


async def run_python(code: str, seconds: float = 2.0, limits: dict[str, int] = LIMITS) -> str:
    """What Python `code` prints, run by the sandboxed evaluator in a bounded process.
    (No preexec_fn sets the limits: it may deadlock a child forked from a process with
    threads, and trio has worker threads. The evaluator sets them itself.)"""
    # -S: the evaluator needs the standard library only, not the site's .pth hooks
    argv = [sys.executable, "-I", "-S", python_sandbox.__file__, json.dumps(limits), code]
    return await run_bounded(argv, seconds)


async def use_tool(tool: str, argument: str, root: str) -> str:
    if tool == "calculator":
        return calculate(argument)
    if tool == "read":  # a thread: on the mount, a read is a round trip to the server
        return await trio.to_thread.run_sync(read_file, root, argument)
    if tool == "python":
        return await run_python(argument)
    return argument.strip()  # finish


async def act(kv: Any, lip: AsyncLip, question: str, root: str, max_steps: int) -> dict[str, Any]:
    """The loop on `kv` (an AsyncKV, or anything with append, generate and truncate)."""
    # ChatML's ends (of the turn, of the text): a thought must not end the answer
    ends = [await lip.tokenize(special) for special in ("<|im_end|>", "<|endoftext|>")]
    greedy = {"temperature": 0.0, "blocked": [ids[0] for ids in ends if len(ids) == 1]}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    length = await kv.append(
        await lip.apply_chat_template(messages) + await lip.tokenize("Thought:")
    )
    steps: list[dict[str, str]] = []
    answer, retries = "", 0
    for _ in range(max_steps):
        thought = await kv.generate(max_tokens=THOUGHT_TOKENS, stop=["\n"], **greedy)
        ended = "\n" in await lip.detokenize(thought.token_ids[-1:])  # in the file, not text
        length = await kv.append(await lip.tokenize("Action:" if ended else "\nAction:"))
        for attempt in range(MAX_RETRIES + 1):
            sampler = (
                greedy if attempt == 0 else {"temperature": 0.8, "seed": 10 * len(steps) + attempt}
            )
            action = await kv.generate(max_tokens=ACTION_TOKENS, grammar=GRAMMAR, **sampler)
            length_after = action.tokens
            call = ACTION.fullmatch(action.text)
            try:
                if call is None:
                    raise ToolError("the action was cut off: it is too long")
                observation = await use_tool(call[1], call[2], root)
                break
            except ToolError as exc:
                observation = str(exc)
                if attempt < MAX_RETRIES:  # roll back to before the action, try another
                    await kv.truncate(length)
                    retries += 1
        length = length_after
        observation = " ".join(observation.split())[:OBSERVATION_CHARS]
        steps.append({"thought": thought.text.strip(), "action": action.text.strip()})
        steps[-1]["observation"] = observation
        if call is not None and call[1] == "finish":  # finish never fails
            answer = observation
            break
        length = await kv.append(await lip.tokenize(f"Observation: {observation}\nThought:"))
    return {"output": answer, "steps": steps, "retries": retries, "tokens": length}


async def run(
    lip: AsyncLip,
    question: str = QUESTION,
    root: str = ".",
    max_steps: int = 4,
    expect: str | None = None,
) -> dict[str, Any]:
    """Answer `question` with the tools; "quality" is 1.0 when the answer holds `expect`."""
    await lip.mkdir("react_agent", parents=True)
    path = f"react_agent/{os.getpid()}-{time.time_ns()}.kv"
    try:
        kv = await lip.kv(path, create=True)
        result = await act(kv, lip, question, root, max_steps)
        result["file_tokens"] = (await kv.stat())["tokens"]
    finally:  # whatever happened (a cancel too), the file goes
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)
    if expect is not None:
        result["quality"] = float(expect in result["output"])
    return result


def text_view() -> str | None:
    """The mount's text view of the KV files (/.sys/text), where the server has a mount."""
    mount = os.environ.get("SYMPHONY_MOUNT")
    return os.path.join(mount, ".sys", "text") if mount else None


async def demo_on_mount(lip: AsyncLip, view: str) -> dict[str, Any]:
    """The demo's question about a KV file of the prices, read[] through the mount."""
    await lip.mkdir("react_agent", parents=True)
    path = f"react_agent/prices-{os.getpid()}-{time.time_ns()}.kv"
    try:
        await (await lip.kv(path, create=True)).append(await lip.tokenize(DEMO_TEXT))
        return await run(lip, ASK.format(path), view)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(SymphonyError):
            await lip.call("kv_unlink", path=path)


def main() -> None:
    args, root = sys.argv[1:], None
    if "--root" in args:
        at = args.index("--root")
        if at + 1 == len(args) or at == 0:
            sys.exit("usage: react_agent.py [QUESTION [--root DIR]]")
        root, args = args[at + 1], args[:at] + args[at + 2 :]
    view = text_view()
    demo_kv = not args and view is not None  # the demo's file a KV file on the mount

    async def go(folder: str) -> dict[str, Any]:
        async with connect() as lip:
            if demo_kv:
                return await demo_on_mount(lip, folder)
            return await run(lip, args[0] if args else QUESTION, folder)

    with tempfile.TemporaryDirectory() as demo:
        if args:
            folder = root or view or "."
        elif demo_kv:
            folder = view
        else:  # the demo's file as text, in a folder of its own
            folder = demo
            Path(demo, DEMO_FILE).write_text(DEMO_TEXT)
        try:
            result = trio.run(go, folder)
        except* SymphonyError as group:  # one line, not the nursery's traceback
            sys.exit(f"react_agent.py: {first_error(group)}")
    for step in result["steps"]:
        print(f"Thought: {step['thought']}\nAction: {step['action']}")
        print(f"Observation: {step['observation']}")
    print(f"answer: {result['output']} ({len(result['steps'])} steps, {result['retries']} retries)")


if __name__ == "__main__":
    main()
