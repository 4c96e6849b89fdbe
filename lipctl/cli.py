"""lipctl: serve, run, ps, kill, status. `main()` returns the exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any

from symphony.lipctl.client import SymphonyError, connect, socket_path
from symphony.lipctl.wire import first_error

log = logging.getLogger("symphony.lipctl")

DEFAULT_MOUNT = "/kv"


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket", help="server socket (default: $SYMPHONY_SOCKET or /tmp/symphony.sock)"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lipctl", description="Symphony: serve and run LIPs.")
    sub = top.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground")
    _add_socket(serve)
    serve.add_argument("--model", help="GGUF file or Hugging Face directory (default: embedded)")
    mount = serve.add_mutually_exclusive_group()
    mount.add_argument(
        "--mount", default=DEFAULT_MOUNT, help=f"mount the KV store here (default {DEFAULT_MOUNT})"
    )
    mount.add_argument("--no-mount", action="store_true", help="serve the socket only")
    serve.add_argument("--state", help="keep KV files here across restarts (fsync, shutdown)")
    serve.add_argument("--socket-mode", default="0666", help="octal mode of the socket")
    serve.add_argument(
        "--quant",
        choices=("auto", "fp32", "int8", "w8a8"),
        default="auto",
        help="auto: int8 on a CPU where it matches fp32 (checked at load), else fp32",
    )
    serve.add_argument(
        "--attention",
        choices=("auto", "sdpa", "flash", "triton"),  # engine.config.ATTENTION_BACKENDS
        default="auto",
        help="auto: flash-attn on CUDA, else triton, else sdpa (each fallback logged)",
    )
    serve.add_argument(
        "--cuda-graphs", action="store_true", help="replay decode steps as CUDA graphs (CUDA)"
    )
    serve.add_argument("--pages", type=int, default=4096, help="KV pages in the pool")
    serve.add_argument(
        "--kv-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="what KV pages hold (auto: the model's dtype); bfloat16 under an fp32 model on "
        "a CPU halves a page's memory and the bytes a long context's step reads",
    )
    serve.add_argument(
        "--page-size",
        type=int,
        default=0,
        help="tokens a KV page (default: the attention backend's, 256 for flash-attn, else "
        "16; --pages then counts 16-token pages, so the pool holds as many tokens)",
    )
    serve.add_argument("--max-step-tokens", type=int, default=512)
    serve.add_argument("--no-prefix-cache", action="store_true")
    serve.add_argument(
        "--uid-pages",
        type=int,
        help="pages one uid but root may hold (default: half the pool)",
    )
    serve.add_argument(
        "--uid-connections", type=int, default=64, help="connections one uid but root may open"
    )
    serve.add_argument(
        "--max-lips-per-uid",
        type=int,
        default=16,
        help="running LIPs one uid may have (root is exempt)",
    )
    serve.add_argument(
        "--max-in-flight", type=int, default=64, help="requests one connection runs at once"
    )
    serve.add_argument(
        "--openai",
        metavar="[HOST:]PORT",
        nargs="?",
        const="127.0.0.1:8000",
        help="also serve the OpenAI API there, as a LIP (default 127.0.0.1:8000)",
    )
    serve.add_argument("--log-level", default="WARNING")
    run = sub.add_parser("run", help="run a LIP on the server, streaming its output")
    _add_socket(run)
    run.add_argument("--priority", type=int, default=0)
    run.add_argument("--pages", type=int, help="page quota")
    run.add_argument("--tokens", type=int, help="token quota: tokens computed for it")
    run.add_argument("--wall-seconds", type=int, help="kill it after this many seconds")
    run.add_argument("program")
    run.add_argument("args", nargs=argparse.REMAINDER)
    for name, text in (("ps", "list processes"), ("status", "pool, files, steps")):
        p = sub.add_parser(name, help=text)
        _add_socket(p)
        p.add_argument("--json", action="store_true")
    kill = sub.add_parser("kill", help="kill a LIP")
    _add_socket(kill)
    kill.add_argument("pid", type=int)
    kill.add_argument("--json", action="store_true")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "run":
            return run(args)
        with connect(args.socket) as lip:
            if args.command == "ps":
                rows = lip.ps()
                print(json.dumps(rows) if args.json else format_ps(rows))
            elif args.command == "status":
                st = lip.status()
                print(json.dumps(st) if args.json else format_status(st))
            elif args.command == "kill":
                row = lip.kill(args.pid)
                print(json.dumps(row) if args.json else f"killed {row['pid']} ({row['name']})")
        return 0
    except SymphonyError as exc:
        print(f"lipctl: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"lipctl: {exc}", file=sys.stderr)
        return 1


def format_ps(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'PID':>7} {'UID':>6} {'STATE':<8} {'PRI':>3} {'TOKENS':>8} {'CALLS':>6}  NAME"]
    for r in rows:
        lines.append(
            f"{r['pid']:>7} {r['uid']:>6} {r['state']:<8} {r['priority']:>3} "
            f"{r['tokens']:>8} {r['syscalls']:>6}  {r['name']}"
        )
    return "\n".join(lines)


def format_status(st: dict[str, Any]) -> str:
    p = st["pages"]
    check = st.get("quant_check")
    kv = st.get("kv_dtype", st["dtype"])  # said only where the pages differ from the model
    return "\n".join(
        [
            f"model      {st['model']} on {st['device']} ({st['dtype']}, {st['quant']} weights"
            f"{'' if kv == st['dtype'] else f', {kv} KV'})",
            *([f"quant      auto chose {st['quant']}: {check}"] if check else []),
            f"pages      {p['total']} total, {p['used']} used ({p['shared']} shared), "
            f"{p['cached']} cached, {p['free']} free",
            f"files      {st['files']}",
            f"processes  {st['processes']}",
            f"steps      {st['steps']}, {st['tokens_computed']} tokens, "
            f"{st['tokens_per_second']} tokens/s while busy",
        ]
    )


def run(args: argparse.Namespace) -> int:
    try:
        with open(args.program) as f:
            program = f.read()
    except OSError as exc:
        print(f"lipctl: cannot read {args.program}: {exc.strerror}", file=sys.stderr)
        return 1
    limits: dict[str, int] = {"priority": args.priority}
    for key in ("pages", "tokens", "wall_seconds"):
        if getattr(args, key) is not None:
            limits[key] = getattr(args, key)
    with connect(args.socket) as lip:
        pid = lip.spawn(program, args.args, name=os.path.basename(args.program), limits=limits)
        out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
        waiter = lip.wait(pid)
        try:
            while True:
                try:
                    item = next(waiter)
                except StopIteration as stop:
                    row = stop.value
                    break
                out[item["fd"]].write(item["data"])
                out[item["fd"]].flush()
        except KeyboardInterrupt:
            with connect(args.socket) as other:
                other.kill(pid)
            return 130
    status = row["exit_status"]
    return status if status >= 0 else 128 - status


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import trio

    from symphony.engine.config import EngineConfig
    from symphony.engine.engine import Engine
    from symphony.engine.errors import EngineError
    from symphony.fs.errors import StoreError
    from symphony.sched.engine_thread import EngineThread
    from symphony.sched.mount import clean_stale_mount
    from symphony.sched.server import Server, ServerConfig

    try:
        config = ServerConfig(
            socket_path=socket_path(args.socket),
            socket_mode=int(args.socket_mode, 8),
            max_step_tokens=args.max_step_tokens,
            prefix_cache=not args.no_prefix_cache,
            mount=None if args.no_mount else args.mount,
            state=args.state,
            uid_pages=args.uid_pages,
            max_connections=args.uid_connections,
            max_in_flight=args.max_in_flight,
            max_lips_per_uid=args.max_lips_per_uid,
            openai=args.openai,
        )
    except ValueError as exc:
        print(f"lipctl serve: {exc}", file=sys.stderr)
        return 1
    hint = " (another mount point: --mount DIR; none: --no-mount)" if config.mount else ""
    try:
        if config.mount == DEFAULT_MOUNT and not os.path.lexists(DEFAULT_MOUNT):
            os.mkdir(DEFAULT_MOUNT, 0o755)
        if config.mount:
            clean_stale_mount(config.mount)  # refused before minutes of model loading
    except (StoreError, OSError) as exc:
        print(f"lipctl serve: {exc}{hint}", file=sys.stderr)
        return 1
    try:
        engine_config = EngineConfig(
            num_pages=args.pages,
            page_size=args.page_size,
            quant=args.quant,
            kv_dtype="" if args.kv_dtype == "auto" else args.kv_dtype,
            attention=args.attention,
            cuda_graphs=args.cuda_graphs,
        )
        # loaded where it will compute: on the engine thread (sched/engine_thread.py)
        engine_thread = EngineThread()
        engine = engine_thread.call(Engine, args.model, engine_config)
        server = Server(engine, config, engine_thread)
    except (EngineError, StoreError, ValueError, OSError) as exc:
        print(f"lipctl serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lipctl serve: interrupted while loading the model", file=sys.stderr)
        return 130
    where = config.socket_path + (f" and {config.mount}" if config.mount else "")

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                print(
                    f"symphony: serving {engine.model_config.name} on {where}",
                    file=sys.stderr,
                    flush=True,
                )
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except (OSError, StoreError, ExceptionGroup) as exc:
        error = first_error(exc)  # trio wraps what a task raised in exception groups
        if not isinstance(error, (OSError, StoreError)):
            raise
        print(f"lipctl serve: {error}{hint}", file=sys.stderr)
        return 1
    print("symphony: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
