"""Running a Symphony server for tests: in a thread (tiny engine) or a subprocess (real model)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import trio

from symphony.engine.engine import Engine
from symphony.fs.nodes import Cred
from symphony.lipctl.launch import start_server, stop_server
from symphony.sched.calls import Call
from symphony.sched.engine_thread import EngineThread
from symphony.sched.server import Server, ServerConfig

ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """A server on its own trio run in a thread; `stop()` cancels it and joins."""

    def __init__(
        self,
        engine: Engine,
        socket_path: str,
        engine_thread: EngineThread | None = None,
        **config: object,
    ) -> None:
        self.server = Server(engine, ServerConfig(socket_path=socket_path, **config), engine_thread)  # type: ignore[arg-type]
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.serve)
                    self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30) or self.error:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)

    def run_sync(self, fn, *args):  # type: ignore[no-untyped-def]
        """Call `fn` inside the server's trio thread (to read its state safely)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def call_as(self, cred: Cred, name: str, **args):  # type: ignore[no-untyped-def]
        """Run one syscall inside the server as `cred`; its result or its StoreError."""
        syscalls = self.server.syscalls
        assert syscalls is not None

        async def no_stream(_: object) -> None:
            pass

        async def run():  # type: ignore[no-untyped-def]
            proc = self.server.procs.attach(4_000_000 + cred.uid, cred)
            return await syscalls.answer(Call(cred, proc, no_stream), name, args)

        return trio.from_thread.run(run, trio_token=self._token)


def start_server_process(
    socket_path: str, *extra: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`lipctl serve` in a subprocess, returned once its socket accepts connections."""
    return start_server(
        socket_path,
        *extra,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


stop_server_process = stop_server
