"""`make demo`: start a server on the embedded model, run LIPs on it, show what they share.

1. `lipctl serve` starts (a progress bar the first time, while the GGUF weights are
   dequantized and cached).
2. A chat question is answered through the syscalls, with prefill and decode speed.
3. The Figure-2 LIP (examples/fork_parallel.py) forks one prefix into branches that
   generate together; it prints their text, the pages they share and timings.
4. `lipctl status` shows the pool; with /dev/fuse, the store is mounted too, and the
   chat's KV file is forked with `cp`, shown with ls -l, du and getfattr, rolled back
   to the question with setfattr, read as text under /.sys, and continued with
   `lipctl run examples/continue.py`; /.sys/status closes.
5. The server stops (and unmounts).

`--engine-only` skips the server and runs the engine in this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from symphony.lipctl.client import SymphonyError, connect
from symphony.lipctl.launch import start_server, stop_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUESTION = "What is the capital of France?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="symphony-demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="GGUF file or Hugging Face directory (default: embedded)")
    parser.add_argument("--prompt", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument(
        "--quant",
        choices=("auto", "fp32", "int8", "w8a8"),
        default="auto",
        help="auto: int8 on a CPU where it matches fp32 (checked at load), else fp32",
    )
    parser.add_argument("--engine-only", action="store_true", help="no server: the engine alone")
    return parser.parse_args(argv)


def chat(socket: str, prompt: str, max_tokens: int) -> int:
    """Ask `prompt` in demo/chat.kv; returns the number of tokens of the question."""
    with connect(socket) as lip:
        lip.mkdir("demo", parents=True)
        kv = lip.kv("demo/chat.kv", create=True)
        ids = lip.apply_chat_template([{"role": "user", "content": prompt}])
        t0 = time.perf_counter()
        kv.append(ids)
        t1 = time.perf_counter()
        result = lip.call(
            "generate", path=kv.path, max_tokens=max_tokens, sampler={"temperature": 0.0}
        )
        t2 = time.perf_counter()
        n = len(result["token_ids"])
        print(f"user    {prompt}")
        print(f"reply   {result['text'].strip()}")
        print(
            f"prefill {len(ids)} tokens at {len(ids) / (t1 - t0):.0f} tok/s, "
            f"decode {n} tokens at {n / (t2 - t1):.1f} tok/s (through the socket)"
        )
        return len(ids)


def show_mount(mount: str, question_tokens: int, lipctl: list[str], env: dict[str, str]) -> None:
    """The KV store as files: a fork by cp, ls, du, getfattr, a rollback, its text, more
    tokens, the server's status."""
    demo = os.path.join(mount, "demo")
    chat, copy = os.path.join(demo, "chat.kv"), os.path.join(demo, "chat-copy.kv")
    steps = [
        ["cp", chat, copy],
        ["ls", "-l", demo],
        ["du", "-k", chat, copy],
        ["getfattr", "--absolute-names", "-d", "-m", "user", copy],
        ["setfattr", "-n", "user.kv.tokens", "-v", str(question_tokens), copy],
        ["cat", os.path.join(mount, ".sys", "text", "demo", "chat-copy.kv")],
        [*lipctl, "run", str(EXAMPLES / "continue.py"), "demo/chat-copy.kv", "24"],
        ["cat", os.path.join(mount, ".sys", "status")],
    ]
    for argv in steps:
        shown = " ".join(a.replace(mount, "/kv") for a in argv).replace(" ".join(lipctl), "lipctl")
        shown = shown.replace(str(EXAMPLES), "examples")
        print(f"\n== $ {shown}", flush=True)
        if shutil.which(argv[0]) is None:
            print(f"({argv[0]} is not installed)")
            continue
        subprocess.call(argv, env=env)
        if argv[0] == "setfattr":
            print("(the copy is rolled back to the question: the answer is gone from it)")


def run_demo(args: argparse.Namespace) -> int:
    workdir = tempfile.mkdtemp(prefix="symphony-demo-")
    socket = os.path.join(workdir, "symphony.sock")
    extra = ["--quant", args.quant, *(["--model", args.model] if args.model else [])]
    mount = os.path.join(workdir, "kv")
    can_mount = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
    if can_mount:
        os.mkdir(mount)
    shown = f" --mount {mount}" if can_mount else ""
    print(f"$ lipctl serve --socket {socket}{shown}", flush=True)
    server = None
    try:
        server = start_server(socket, *extra, mount=mount if can_mount else None)
        print("\n== a chat turn through the syscalls")
        question_tokens = chat(socket, args.prompt, args.max_tokens)
        print(f"\n== $ lipctl run examples/fork_parallel.py {args.branches}")
        env = {**os.environ, "SYMPHONY_SOCKET": socket}
        lipctl = [sys.executable, "-m", "symphony.lipctl.cli"]
        program = EXAMPLES / "fork_parallel.py"
        if not program.exists():
            raise SymphonyError("ENOENT", f"{program} is missing (run the demo from a checkout)")
        code = subprocess.call([*lipctl, "run", str(program), str(args.branches)], env=env)
        if code:
            raise SymphonyError("EIO", f"the LIP exited with status {code}")
        print("\n== $ lipctl status")
        subprocess.call([*lipctl, "status"], env=env)
        if can_mount:
            show_mount(mount, question_tokens, lipctl, env)
        else:
            print("\n(no /dev/fuse here: the KV store is not mounted)")
    except SymphonyError as exc:
        print(f"symphony-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run_engine_only(args: argparse.Namespace) -> int:
    from symphony.engine.config import EngineConfig
    from symphony.engine.engine import Engine
    from symphony.engine.errors import EngineError
    from symphony.engine.generate import BatchGenerator, Generation

    try:
        engine = Engine(args.model, EngineConfig(quant=args.quant))
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        gen = Generation(prompt)
        runner = BatchGenerator(engine)
        runner.run([gen], args.max_tokens)
    except (EngineError, ValueError, OSError) as exc:
        print(f"symphony-demo: {exc}", file=sys.stderr)
        return 1
    s = runner.stats
    print(f"weights {engine.quant}" + (f" ({c.describe()})" if (c := engine.quant_check) else ""))
    print(f"user    {args.prompt}")
    print(f"reply   {engine.tokenizer.decode(gen.output_ids, skip_special=True).strip()}")
    print(f"prefill {s.prefill_tokens} tokens at {s.prefill_tps:.0f} tok/s")
    print(f"decode  {s.decode_tokens} tokens at {s.decode_tps:.1f} tok/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_only:
        return run_engine_only(args)
    if args.model and not Path(args.model).exists():
        print(f"symphony-demo: model not found: {args.model}", file=sys.stderr)
        return 1
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
