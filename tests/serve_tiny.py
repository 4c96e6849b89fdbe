"""A server on the tiny random-weight model, for mount tests.

python -m tests.serve_tiny SOCKET MOUNT
"""

from __future__ import annotations

import signal
import sys

import trio

from symphony.sched.server import Server, ServerConfig
from tests.conftest import make_tiny_engine


async def main(socket: str, mount: str, state: str | None) -> None:
    engine = make_tiny_engine(num_pages=64, page_size=4)
    server = Server(engine, ServerConfig(socket, mount=mount, state=state))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
