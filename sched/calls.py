"""The syscalls: what each call of DESIGN.md's table does, over the store and scheduler."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.engine.engine import Engine
from symphony.fs.errors import StoreError
from symphony.fs.nodes import R_OK, W_OK, Cred
from symphony.fs.store import KVStore
from symphony.sched import args as A
from symphony.sched import schema as S
from symphony.sched.processes import Limits, Proc, ProcessTable
from symphony.sched.protocol import MAX_FRAME, PROTOCOL_VERSION
from symphony.sched.scheduler import Scheduler
from symphony.sched.tasks import Task
from symphony.sched.verify import verify_file

log = logging.getLogger(__name__)

# Characters one tokenize or chat template call takes (schema.MAX_TEXT). Tokenizing runs
# in a worker thread, but the tokenizer holds the GIL part of the time: 1 Mi characters
# keep the server's loop waiting 36 ms at worst here (4 Mi: 120 ms). Token ids one
# detokenize call takes: schema.MAX_IDS (decoding holds the GIL: ~13 ms).


@dataclass
class Call:
    """One request in progress: who asks, and how to stream to them."""

    cred: Cred
    proc: Proc
    stream: Callable[[Any], Awaitable[None]]
    # set by a cancel frame for this request: the work it waits on is cancelled, and
    # the call answers with what that leaves (ECANCELED, or a generate's result)
    cancelled: trio.Event = field(default_factory=trio.Event)


Handler = Callable[["Syscalls", Call, Any], Awaitable[Any]]  # Any: the call's S.Args
HANDLERS: dict[str, Handler] = {}


def syscall(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


class Syscalls:
    """The server's state as the syscalls see it."""

    def __init__(
        self,
        engine: Engine,
        store: KVStore,
        scheduler: Scheduler,
        procs: ProcessTable,
        nursery: trio.Nursery,
    ) -> None:
        self.engine = engine
        self.store = store
        self.scheduler = scheduler
        self.procs = procs
        self.nursery = nursery
        # tokenizer and template work, off the trio thread, one call at a time, and at
        # most one queued per uid: the queue takes the uids in turn
        self.cpu_limiter = trio.CapacityLimiter(1)
        self._cpu_by_uid: dict[int, trio.Lock] = {}

    async def in_worker(self, call: Call, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-heavy `fn(*args)` (tokenizing, templates) in a worker thread."""
        uid = call.cred.uid
        lock = self._cpu_by_uid.setdefault(uid, trio.Lock())
        try:
            async with lock:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.cpu_limiter)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._cpu_by_uid.pop(uid, None)

    async def dispatch(self, call: Call, name: Any, args: Any) -> Any:
        handler = HANDLERS.get(name) if isinstance(name, str) else None
        if handler is None:
            raise StoreError(errno.ENOSYS, f"no such call: {name!r}")
        call.proc.syscalls += 1
        spec = S.CALLS.get(name)  # every call of this server has one (tested); a test's may not
        return await handler(self, call, A.parse(args, spec.args) if spec else args)

    async def answer(self, call: Call, name: Any, args: Any) -> Any:
        """The call's result, or the StoreError it ends with; a bug is logged and ends
        with EIO. A peer gone while results stream to it (trio's resource errors) is
        raised, as nobody is left to answer."""
        try:
            return await self.dispatch(call, name, args)
        except StoreError as exc:
            return exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:  # a bug must not take the server down
            log.exception("call %r failed", name)
            return StoreError(errno.EIO, "internal error; the server logged it")

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        running = [p for p in self.procs.procs.values() if p.state == "running"]
        return {
            **self.store.status(),
            "processes": len(running),
            "model": self.engine.model_config.name,
            "device": self.engine.config.device,
            "dtype": str(self.engine.config.torch_dtype).removeprefix("torch."),
            "kv_dtype": str(self.engine.config.torch_kv_dtype).removeprefix("torch."),
            "quant": self.engine.quant,
            "quant_check": check.describe() if (check := self.engine.quant_check) else None,
            "steps": s.num_steps,
            "tokens_computed": s.num_tokens,
            "tokens_per_second": round(s.num_tokens / s.busy_seconds, 1) if s.busy_seconds else 0.0,
            "waiting": s.num_waiting,
        }

    async def run_task(self, task: Task) -> dict[str, Any]:
        """Submit `task` and wait; cancelled (the caller went away) means cancel it."""
        self.scheduler.submit(task)
        try:
            await task.done.wait()
        finally:
            self.scheduler.cancel(task)
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    async def run_tasks(self, call: Call, tasks: list[Task]) -> list[dict[str, Any]]:
        """Submit `tasks` together and wait for all; a cancel frame for the call, or the
        caller going away, cancels them (each ends within one engine step).

        Raises:
            StoreError: the first task's error, in order.
        """
        self.scheduler.submit_many(tasks)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.cancel_on_request, call, tasks)
                for task in tasks:
                    await task.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            for task in tasks:
                self.scheduler.cancel(task)
        for task in tasks:
            if task.error is not None:
                raise task.error
        return [task.result for task in tasks if task.result is not None]

    async def cancel_on_request(self, call: Call, tasks: list[Task]) -> None:
        """Cancel `tasks` when the caller sends a cancel frame for `call`."""
        await call.cancelled.wait()
        for task in tasks:
            self.scheduler.cancel(task)


@syscall("hello")
async def _hello(sys: Syscalls, call: Call, a: S.NoArgs) -> Any:
    mc = sys.engine.model_config
    return {
        "protocol": PROTOCOL_VERSION,
        "model": {
            "name": mc.name,
            "vocab_size": mc.vocab_size,
            "page_size": sys.engine.page_size,
            "max_context": mc.max_position,
            "fingerprint": sys.engine.fingerprint,
        },
        "limits": {"max_frame": MAX_FRAME, "max_step_tokens": sys.scheduler.max_step_tokens},
        "pid": call.proc.pid,
        "uid": call.cred.uid,
    }


def _bounded(text: str, what: str) -> str:
    if len(text) > S.MAX_TEXT:
        raise StoreError(errno.E2BIG, f"{what} of {len(text)} characters; at most {S.MAX_TEXT}")
    return text


@syscall("tokenize")
async def _tokenize(sys: Syscalls, call: Call, a: S.Tokenize) -> Any:
    text = _bounded(a.text, "text")
    return await sys.in_worker(call, sys.engine.tokenizer.encode, text, a.special)


@syscall("detokenize")
async def _detokenize(sys: Syscalls, call: Call, a: S.Detokenize) -> Any:
    if len(a.ids) > S.MAX_IDS:
        raise StoreError(errno.E2BIG, f"{len(a.ids)} token ids; at most {S.MAX_IDS} a call")
    vocab = sys.engine.tokenizer.vocab_size

    def decode() -> str:
        if not all(0 <= i < vocab for i in a.ids):
            raise A.einval(f"ids must be token ids in 0..{vocab - 1}")
        return sys.engine.tokenizer.decode(a.ids, skip_special=a.skip_special)

    return await sys.in_worker(call, decode)


@syscall("apply_chat_template")
async def _chat(sys: Syscalls, call: Call, a: S.ChatTemplate) -> Any:
    messages = [{"role": m.role, "content": m.content} for m in a.messages]
    _bounded("".join(m["role"] + m["content"] for m in messages), "messages")

    def render() -> list[int]:
        try:
            return sys.engine.tokenizer.apply_chat_template(
                messages, a.add_generation_prompt, a.special
            )
        except Exception as exc:  # a template can fail in any way on odd input
            raise A.einval(f"chat template failed: {exc}") from None

    return await sys.in_worker(call, render)


@syscall("kv_open")
async def _kv_open(sys: Syscalls, call: Call, a: S.KvOpen) -> Any:
    file = sys.store.open(a.path, call.cred, a.create, a.exclusive, a.mode)
    return sys.store.file_stat(file)


@syscall("kv_stat")
async def _kv_stat(sys: Syscalls, call: Call, a: S.KvPath) -> Any:
    return sys.store.stat(a.path, call.cred)


@syscall("kv_fork")
async def _kv_fork(sys: Syscalls, call: Call, a: S.KvFork) -> Any:
    file = sys.store.fork(a.src, a.dst, call.cred, a.mode, call.proc.account.holder)
    return sys.store.file_stat(file)


@syscall("kv_truncate")
async def _kv_truncate(sys: Syscalls, call: Call, a: S.KvTruncate) -> Any:
    sys.store.truncate(a.path, a.n, call.cred)
    return sys.store.stat(a.path, call.cred)


@syscall("kv_drop")
async def _kv_drop(sys: Syscalls, call: Call, a: S.KvDrop) -> Any:
    sys.store.drop(a.path, a.start, a.end, call.cred, call.proc.account.holder, a.reposition)
    return sys.store.stat(a.path, call.cred)


@syscall("kv_concat")
async def _kv_concat(sys: Syscalls, call: Call, a: S.KvConcat) -> Any:
    holder = call.proc.account.holder
    file = sys.store.concat(a.dst, a.srcs, call.cred, a.reposition, a.mode, holder)
    return sys.store.file_stat(file)


@syscall("kv_verify")
async def _kv_verify(sys: Syscalls, call: Call, a: S.KvPath) -> Any:
    file = sys.store.ns.lookup_file(a.path, call.cred, R_OK)
    may_adopt = file.allows(call.cred, W_OK)
    account = call.proc.account
    return await verify_file(sys.engine, sys.store, sys.scheduler, account, file, may_adopt)


@syscall("kv_unlink")
async def _kv_unlink(sys: Syscalls, call: Call, a: S.KvPath) -> Any:
    sys.store.unlink(a.path, call.cred)
    return None


@syscall("mkdir")
async def _mkdir(sys: Syscalls, call: Call, a: S.Mkdir) -> Any:
    if a.parents:
        sys.store.ns.makedirs(a.path, call.cred, a.mode)  # one walk: linear in the depth
    else:
        sys.store.ns.mkdir(a.path, call.cred, a.mode)
    return None


@syscall("listdir")
async def _listdir(sys: Syscalls, call: Call, a: S.Listdir) -> Any:
    return sys.store.ns.listdir(a.path, call.cred)


@syscall("status")
async def _status(sys: Syscalls, call: Call, a: S.NoArgs) -> Any:
    return sys.status()


@syscall("ps")
async def _ps(sys: Syscalls, call: Call, a: S.NoArgs) -> Any:
    return [p.row() for p in sorted(sys.procs.procs.values(), key=lambda p: p.pid)]


@syscall("spawn")
async def _spawn(sys: Syscalls, call: Call, a: S.Spawn) -> Any:
    limits = Limits.from_args(a.limits)
    if limits.priority > 0 and not call.cred.is_root:
        raise StoreError(errno.EPERM, "only root may raise a program's priority")
    sys.procs.reap_finished()
    proc = await sys.procs.spawn(sys.nursery, call.cred, a.program, a.args, a.name, a.env, limits)
    return {"pid": proc.pid}


@syscall("kill")
async def _kill(sys: Syscalls, call: Call, a: S.Pid) -> Any:
    return sys.procs.kill(a.pid, call.cred).row()


@syscall("wait")
async def _wait(sys: Syscalls, call: Call, a: S.Pid) -> Any:
    """Stream a spawned program's output from the start, then return its exit status."""
    pid = a.pid
    proc = sys.procs.procs.get(pid)
    if proc is None or not proc.spawned:
        raise StoreError(errno.ESRCH, f"no program {pid} run by this server")
    if not call.cred.is_root and call.cred.uid != proc.uid:
        raise StoreError(errno.EPERM, f"program {pid} belongs to uid {proc.uid}")
    sent = 0
    while True:
        changed = proc.changed
        while sent < len(proc.output):
            fd, data = proc.output[sent]
            sent += 1
            await call.stream({"fd": fd, "data": data})
        if proc.exit_status is not None:
            return proc.row()
        if call.cancelled.is_set():  # the waiter gave up; the program runs on
            raise StoreError(errno.ECANCELED, "the wait was cancelled")
        await first_of(changed, call.cancelled)


async def first_of(*events: trio.Event) -> None:
    """Return when one of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def one(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(one, event)


# the prediction calls (forward, forward_many, verify, generate) and kv_constrain
# register themselves
from symphony.sched import grammar_calls, prediction  # noqa: E402,F401
