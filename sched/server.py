"""The syscall server: a unix socket, one task per connection, one per request in flight."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import select
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from symphony.engine.engine import Engine
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammars
from symphony.fs.nodes import ROOT, Cred
from symphony.fs.persistence import StateDir
from symphony.fs.store import KVStore
from symphony.sched.admission import Admission, InFlight
from symphony.sched.calls import Call, Syscalls
from symphony.sched.engine_thread import EngineThread
from symphony.sched.limits import Limits
from symphony.sched.mount import Mount
from symphony.sched.processes import Proc, ProcessCaps, ProcessTable
from symphony.sched.protocol import (
    MAX_ARRAY,
    FrameBuffer,
    FrameError,
    encode,
    error_reply,
    ok_reply,
)
from symphony.sched.scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/tmp/symphony.sock"
_PEERCRED = struct.Struct("3i")
FRAME_SECONDS = 30.0  # a frame begun must be whole within this, or the connection ends
# requests read from one connection but waiting for a slot: past either bound the server
# stops reading it (until then it reads on, for the cancel frames behind them)
PENDING_REQUESTS = 64
PENDING_BYTES = 1 << 20
Send = Callable[[dict[str, Any]], Awaitable[None]]


def default_socket() -> str:
    return os.environ.get("SYMPHONY_SOCKET") or DEFAULT_SOCKET


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the syscall server listens, and how big its steps are."""

    socket_path: str = DEFAULT_SOCKET
    socket_mode: int = 0o666
    max_step_tokens: int = 512
    prefix_cache: bool = True
    mount: str | None = None  # where to mount the store with FUSE; None: no mount
    state: str | None = None  # where KV files persist across restarts; None: they do not
    # per connection: requests running at once (then the server stops reading it)
    max_in_flight: int = 64
    # per uid but root's, over all its connections: requests in flight, each counting
    # once per 256 KiB of its frame (so 64 MiB of requests at most)
    max_uid_in_flight: int = 256
    # per uid but root's: connections open at once
    max_connections: int = 64
    # per uid but root's: pages held (files, work in flight, its cached prefixes);
    # None: half the pool
    uid_pages: int | None = None
    max_lips_per_uid: int = 16  # running LIPs of one uid but root
    # [HOST:]PORT: start the OpenAI-compatible LIP there (as the server's user)
    openai: str | None = None

    def __post_init__(self) -> None:
        if not self.socket_path:
            raise ValueError("the socket path is empty")
        if len(self.socket_path.encode()) > 107:
            raise ValueError(f"socket path too long for a unix socket: {self.socket_path}")
        if self.max_step_tokens < 1:
            raise ValueError("max_step_tokens must be at least 1")
        if self.openai is not None:
            port = self.openai.rpartition(":")[2]
            if not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"--openai takes [HOST:]PORT, not {self.openai!r}")
        if min(self.max_in_flight, self.max_uid_in_flight, self.max_connections) < 1:
            raise ValueError("max_in_flight, max_uid_in_flight, max_connections must be >= 1")
        if self.uid_pages is not None and self.uid_pages < 1:
            raise ValueError("uid_pages must be at least 1")
        if self.max_lips_per_uid < 1:
            raise ValueError("max_lips_per_uid must be at least 1")


def peer_cred(sock: trio.socket.SocketType) -> tuple[int, Cred]:
    """The peer's pid and credentials, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    groups: frozenset[int] = frozenset()
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups = frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return pid, Cred(uid, gid, groups)


class Server:
    """Engine, store, scheduler, process table and the socket, in one trio run."""

    def __init__(
        self, engine: Engine, config: ServerConfig, engine_thread: EngineThread | None = None
    ) -> None:
        """`engine_thread`: the thread that loaded `engine`, where it computes best
        (sched/engine_thread.py); None: one of the scheduler's own while it runs."""
        self.engine = engine
        self.config = config
        mc = engine.model_config
        self.store = KVStore(
            engine.pool,
            engine.fingerprint,
            mc.vocab_size,
            mc.max_position,
            prefix_cache=config.prefix_cache,
            uid_share=config.uid_pages or max(1, engine.pool.num_pages // 2),
            rotate_keys=engine.rotate_keys,
        )
        tokenizer = engine.tokenizer
        self.store.grammars = Grammars(tokenizer.json, mc.vocab_size, tokenizer.stop_token_ids)
        # like /tmp: everyone may make files, nobody may remove another's
        self.store.ns.chmod("", ROOT, 0o1777)
        self.scheduler = Scheduler(
            engine, self.store, config.max_step_tokens, engine_thread=engine_thread
        )
        mount = os.path.abspath(config.mount) if config.mount else None
        caps = ProcessCaps(max_lips_per_uid=config.max_lips_per_uid)
        self.procs = ProcessTable(os.path.abspath(config.socket_path), mount, caps=caps)
        self.syscalls: Syscalls | None = None
        self.state: StateDir | None = None
        self.mount: Mount | None = None
        if config.state:
            state = self.state = StateDir(config.state, self.store)
            self.store.on_unlinked = lambda file: state.forget(file.inode)
            restored = state.restore()
            log.info("restored %d KV files from %s", restored, config.state)
        self._connections: dict[int, int] = {}  # pid -> open connections
        self.admission = Admission(config.max_connections, config.max_uid_in_flight)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; spawned programs are killed and the socket removed after."""
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                self.syscalls = Syscalls(
                    self.engine, self.store, self.scheduler, self.procs, nursery
                )
                await nursery.start(self.scheduler.run)
                if self.store.grammars is not None:  # half a second for a real vocabulary
                    nursery.start_soon(trio.to_thread.run_sync, self.store.grammars.warm)
                if self.config.mount:
                    self.mount = Mount(self, self.config.mount)
                    self.scheduler.after_step = self.mount.cache.invalidate_attributes
                    await nursery.start(self.mount.run)
                await nursery.start(trio.serve_listeners, self._handle, [listener])
                log.info("serving on %s", self.config.socket_path)
                if self.config.openai:
                    await self._start_openai(nursery, self.config.openai)
                task_status.started()
        finally:
            self.procs.kill_all()
            with trio.CancelScope(shield=True):
                await listener.aclose()
            _remove_socket(self.config.socket_path)
            if self.state is not None:
                self.state.save_all()

    async def _start_openai(self, nursery: trio.Nursery, where: str) -> None:
        """The OpenAI-compatible server, a LIP of the server's own user like any other:
        it may hold a uid's share of the pages (root's LIPs are not bound by the share
        otherwise) and runs as long as the server (the most CPU time any LIP gets)."""
        host, _, port = where.rpartition(":")
        args = ["--host", host or "127.0.0.1", "--port", port]
        me = Cred(os.getuid(), os.getgid())
        program = "from symphony.lipctl.openai_api.__main__ import main\nmain()\n"
        limits = Limits(
            cpu_seconds=self.procs.caps.max_cpu_seconds, pages=self.store.charges.uid_share
        )
        key = os.environ.get("SYMPHONY_API_KEY")  # in its environment, not in ps's argv
        env = {"SYMPHONY_API_KEY": key} if key else {}
        proc = await self.procs.spawn(nursery, me, program, args, "openai_server.py", env, limits)
        log.info("the OpenAI API starts on %s (pid %d)", where, proc.pid)

    async def _listen(self) -> trio.SocketListener:
        path = self.config.socket_path
        _remove_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, self.config.socket_mode)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return trio.SocketListener(sock)

    def attach_client(self, pid: int, cred: Cred) -> Proc:
        """The process table's entry for a new connection (or /.sys/ctl) of `pid`."""
        proc = self.procs.attach(pid, cred)
        self._connections[pid] = self._connections.get(pid, 0) + 1
        return proc

    def detach_client(self, proc: Proc) -> None:
        self._connections[proc.pid] -= 1
        if not self._connections[proc.pid]:
            del self._connections[proc.pid]
            self.procs.detach(proc)

    async def after_call(self) -> None:
        """Tell the kernel what a call changed, before its caller hears back."""
        if self.mount is not None:
            await self.mount.cache.invalidate()

    async def _handle(self, stream: trio.SocketStream) -> None:
        assert self.syscalls is not None
        pid, cred = peer_cred(stream.socket)
        try:
            self.admission.admit(cred)
        except StoreError as exc:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode(error_reply(None, exc.errno_name, exc.args[0])))
            await stream.aclose()
            return
        proc = self.attach_client(pid, cred)
        lock = trio.Lock()

        async def send(message: dict[str, Any]) -> None:
            async with lock:
                await stream.send_all(encode(message))

        try:
            async with trio.open_nursery() as nursery:
                half_closed = await self._read_requests(stream, send, nursery, cred, proc)
                # a peer that only shut its writing side still reads: its calls finish
                # and answer; a peer gone (or that spoke nonsense) has them cancelled
                if not half_closed or _peer_gone(stream.socket):
                    nursery.cancel_scope.cancel()
        except Exception:  # one connection's trouble must never end the server
            log.exception("connection of pid %d failed", pid)
        finally:
            self.admission.release(cred)
            self.detach_client(proc)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_requests(
        self, stream: trio.SocketStream, send: Send, nursery: trio.Nursery, cred: Cred, proc: Proc
    ) -> bool:
        """Read frames until the peer stops sending; True if it ended its side cleanly
        (end of file), False if it sent something unreadable or was reset.

        A request waits for one of `max_in_flight` slots (and its uid's budget) in a
        bounded queue (PENDING_REQUESTS, PENDING_BYTES) that `_start_requests` takes
        from; while the queue is full the server stops reading (the socket's buffers push
        back on the client). Cancel frames are handled here, as they are read: they take
        no slot, so a request can be cancelled while all the slots are busy. A frame
        begun must be whole within FRAME_SECONDS: a half-sent frame pins memory.
        """
        frames = FrameBuffer(max_array=MAX_ARRAY)
        conn = _Connection(cred, proc, send)
        deadline = math.inf
        nursery.start_soon(self._start_requests, conn, nursery)
        with conn.queue:
            try:
                while True:
                    if conn.full:
                        await conn.room()
                        # a frame's clock runs from when the server reads again: waiting
                        # for a free slot is the server's doing, not the client's
                        if frames.partial:
                            deadline = trio.current_time() + FRAME_SECONDS
                    data = b""
                    with trio.move_on_at(deadline) as waiting:
                        data = await stream.receive_some(65536)
                    if waiting.cancelled_caught:
                        message = f"a frame was not completed within {FRAME_SECONDS:g} s"
                        await send(error_reply(None, "ETIMEDOUT", message))
                        return False
                    if not data:
                        return True
                    was_partial = frames.partial
                    frames.feed(data)
                    try:
                        received = frames.frames()
                    except FrameError as exc:
                        await send(error_reply(None, "EPROTO", str(exc)))
                        return False  # the stream is unusable: close the connection
                    for request, size in zip(received, frames.sizes, strict=True):
                        await conn.take(request, size)
                    if not frames.partial:
                        deadline = math.inf
                    elif not was_partial or received:  # a new frame begins
                        deadline = trio.current_time() + FRAME_SECONDS
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False  # reset by the peer

    async def _start_requests(self, conn: _Connection, nursery: trio.Nursery) -> None:
        """Start each queued request once it has a slot and its uid's budget; ends when
        the reader does and the queue is empty."""
        in_flight = trio.Semaphore(self.config.max_in_flight)
        uid_budget = self.admission.in_flight(conn.cred)
        with conn.queued:
            async for rid, call, request, size in conn.queued:
                await in_flight.acquire()
                units = 0 if uid_budget is None else await uid_budget.take(size)
                conn.started(size)
                release = functools.partial(self._release_slot, in_flight, uid_budget, units)
                nursery.start_soon(self._serve_one, release, conn, rid, call, request)

    @staticmethod
    def _release_slot(in_flight: trio.Semaphore, uid_budget: InFlight | None, units: int) -> None:
        in_flight.release()
        if uid_budget is not None:
            uid_budget.give(units)

    async def _serve_one(
        self,
        release: Callable[[], None],
        conn: _Connection,
        rid: int,
        call: Call,
        request: dict[str, Any],
    ) -> None:
        try:
            await self._serve_call(conn, rid, call, request)
        finally:
            conn.forget(rid, call)
            release()

    async def _serve_call(
        self, conn: _Connection, rid: int, call: Call, request: dict[str, Any]
    ) -> None:
        assert self.syscalls is not None
        try:
            outcome = await self.syscalls.answer(call, request.get("call"), request.get("args", {}))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        if isinstance(outcome, StoreError):
            reply = error_reply(rid, outcome.errno_name, outcome.args[0])
        else:
            reply = ok_reply(rid, outcome)
        await self.after_call()
        # answered from here on: a cancel frame now is for a finished call, and the id is
        # free again once the client has the reply
        conn.forget(rid, call)
        try:
            await conn.send(reply)
        except FrameError as exc:
            await _send_quietly(conn.send, error_reply(rid, "E2BIG", str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


Queued = tuple[int, Call, dict[str, Any], int]  # request id, its call, the frame, its size


class _Connection:
    """One connection's requests by id, from when they are read until they are answered
    (so a cancel frame finds its call), and the bounded queue of those read but waiting
    for a slot."""

    def __init__(self, cred: Cred, proc: Proc, send: Send) -> None:
        self.cred = cred
        self.proc = proc
        self.send = send
        self.calls: dict[int, Call] = {}
        self.queue, self.queued = trio.open_memory_channel[Queued](math.inf)  # bounded by full
        self._num_queued = 0
        self._queued_bytes = 0
        self._room = trio.Event()

    async def take(self, frame: dict[str, Any], size: int) -> None:
        """A cancel frame cancels its call; a request is queued for a slot (or refused,
        answered EINVAL, for want of a fresh integer id)."""
        if "cancel" in frame and "call" not in frame:
            self.cancel(frame["cancel"])  # no reply: the call itself answers
            return
        rid = frame.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            message = "a request needs an integer id"
            await _send_quietly(self.send, error_reply(None, "EINVAL", message))
            return
        if rid in self.calls:
            message = f"request id {rid} is already in flight on this connection"
            await _send_quietly(self.send, error_reply(rid, "EINVAL", message))
            return
        send = self.send

        async def stream(value: Any) -> None:
            await send({"id": rid, "stream": value})

        call = self.calls[rid] = Call(self.cred, self.proc, stream)
        self._num_queued += 1
        self._queued_bytes += size
        self.queue.send_nowait((rid, call, frame, size))

    def cancel(self, rid: Any) -> None:
        """Set `cancelled` on the call of `rid`; an unknown or finished id is ignored."""
        call = self.calls.get(rid) if isinstance(rid, int) else None
        if call is not None:
            call.cancelled.set()

    def forget(self, rid: int, call: Call) -> None:
        if self.calls.get(rid) is call:
            del self.calls[rid]

    @property
    def full(self) -> bool:
        """Whether the queue holds as much as a connection may have waiting."""
        return self._num_queued >= PENDING_REQUESTS or self._queued_bytes >= PENDING_BYTES

    def started(self, size: int) -> None:
        self._num_queued -= 1
        self._queued_bytes -= size
        self._room.set()

    async def room(self) -> None:
        """Wait until the queue is no longer full."""
        while self.full:
            self._room = trio.Event()
            await self._room.wait()


async def _send_quietly(send: Any, message: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await send(message)


def _peer_gone(sock: trio.socket.SocketType) -> bool:
    """Whether the peer closed its socket (POLLHUP), not just its writing side."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _remove_socket(path: str) -> None:
    """Remove a socket left by an earlier server; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StoreError(errno.EEXIST, f"{path} exists and is not a socket")
    os.unlink(path)
