"""`python -m symphony.lipctl.openai_api [--host H] [--port P] [--api-key K]`: the
OpenAI-compatible server as a LIP (examples/openai_server.py and `lipctl serve --openai`
run this)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

import trio

from symphony.lipctl.openai_api.app import serve

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An OpenAI-compatible server, as a LIP")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SYMPHONY_API_KEY"),
        help="require this bearer token (default $SYMPHONY_API_KEY; none: open)",
    )
    parser.add_argument("--max-requests", type=int, default=32, help="generating at once")
    parser.add_argument(
        "--queue-seconds", type=float, default=30.0, help="a request's wait for a turn (then 503)"
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=60.0,
        help="a stream whose client reads nothing this long is cancelled",
    )
    args = parser.parse_args(argv)
    if args.max_requests < 1 or args.queue_seconds < 0 or args.stall_seconds <= 0:
        parser.error(
            "--max-requests is at least 1, --queue-seconds at least 0, --stall-seconds above 0"
        )

    async def run() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, stop)
            binds = await nursery.start(
                serve,
                args.host,
                args.port,
                args.api_key,
                None,
                args.max_requests,
                args.queue_seconds,
                args.stall_seconds,
                stop,
            )
            print(f"serving the OpenAI API on {', '.join(binds)}", flush=True)

    trio.run(run)


STOP_SECONDS = 5.0  # a stop waits this long for streams whose clients read nothing


def _cut_streams() -> None:
    log.warning("streams still being sent after %g s: cut", STOP_SECONDS)
    os._exit(1)


async def _stop_on_signal(stop: trio.Event) -> None:
    """SIGTERM or SIGINT stops it cleanly: every request's work is cancelled (and so its
    files removed) and answered 503; streams whose clients read nothing get
    STOP_SECONDS, then the process exits with status 1."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: stopping", signum)
            deadline = threading.Timer(STOP_SECONDS, _cut_streams)
            deadline.daemon = True
            deadline.start()
            stop.set()
            return


if __name__ == "__main__":
    main()
