"""/.sys/ctl: the syscalls as text lines, for admins without the client library.

    exec 3<>/kv/.sys/ctl
    echo 'kv_fork demo/a.kv demo/b.kv' >&3
    echo 'generate demo/b.kv max_tokens=16 sampler={"temperature":0}' >&3
    cat <&3

A line is a call name, then its positional arguments (POSITIONAL; for kv_concat the
words after the first are its sources), a bare flag word after them (FLAGS: `kv_drop
demo/a.kv 4 60 reposition`), and `key=value` words, separated by blanks. A value is
JSON where it parses as JSON (numbers, true, "quoted text", lists and maps, which may
hold blanks), else the bare word as text; a path or text written bare stays text. Every
line gets one reply line, in order: `ok JSON` or `error ERRNO message`. A read waits for
the replies of the lines written so far and ends (EOF) when none is pending.
`forward PATH text=...` tokenizes the text for you. Closing the file drops the
lines not yet answered, unless it was opened write-only: `echo CMD > ctl` runs CMD.
"""

from __future__ import annotations

import base64
import errno
import json
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.sched.calls import Call, Syscalls
from symphony.sched.processes import Proc

POSITIONAL = {
    "tokenize": ("text",),
    "detokenize": ("ids",),
    "kv_open": ("path",),
    "kv_stat": ("path",),
    "kv_fork": ("src", "dst"),
    "kv_truncate": ("path", "n"),
    "kv_drop": ("path", "start", "end"),
    "kv_constrain": ("path", "grammar"),
    "kv_concat": ("dst",),
    "kv_unlink": ("path",),
    "mkdir": ("path",),
    "listdir": ("path",),
    "forward": ("path", "tokens"),
    "verify": ("path", "draft"),
    "kv_verify": ("path",),
    "generate": ("path",),
    "kill": ("pid",),
    "wait": ("pid",),
}
REST = {"kv_concat": "srcs"}  # the list the positional words past POSITIONAL's fill
FLAGS = {"kv_drop": ("reposition",)}  # bare words after the positional ones: name=true
MAX_LINE = 1 << 20  # bytes in one command line
MAX_QUEUED = 64  # lines of one opener waiting to run before its writes wait (backpressure)

STRINGS = {"path", "src", "dst", "text", "name", "program"}  # never read as JSON


def parse_command(line: str) -> tuple[str, dict[str, Any]]:
    """A command line as (call name, args).

    Raises:
        StoreError: EINVAL for a malformed JSON value or more positional words than the
            call takes.
    """
    words = list(_words(line))
    if not words:
        raise StoreError(errno.EINVAL, "an empty command")
    first, (name, _) = words[0]
    if first is not None:
        raise StoreError(errno.EINVAL, "a command starts with a call name")
    slots = iter(POSITIONAL.get(name, ()))
    args: dict[str, Any] = {}
    rest: list[str] = []
    for key, (raw, value) in words[1:]:
        if key is None:
            key = next(slots, None)
            if key is None and raw in FLAGS.get(name, ()):
                key, value = raw, True
            elif key is None and name in REST:
                rest.append(value if isinstance(value, str) else raw)  # paths, as text
                continue
            elif key is None:
                raise StoreError(errno.EINVAL, f"{name} takes no argument {raw!r}; use key=value")
        if key in STRINGS and not isinstance(value, str):
            value = raw  # a path or text written bare stays text, even `42`
        args[key] = value
    if rest:
        args[REST[name]] = rest
    return name, args


Word = tuple[str | None, tuple[str, Any]]  # key (None: positional), (raw text, value)


def _words(line: str) -> Iterator[Word]:
    """Split on blanks; a value opening with a quote, [ or { runs to the end of its JSON."""
    pos, n = 0, len(line)
    while True:
        while pos < n and line[pos].isspace():
            pos += 1
        if pos == n:
            return
        key = None
        match = _KEYWORD.match(line, pos)
        if match:
            key, pos = match[1], match.end()
        if pos < n and line[pos] in '"[{':
            try:
                value, end = _JSON.raw_decode(line, pos)
            except ValueError as exc:
                raise StoreError(errno.EINVAL, f"bad JSON value: {exc}") from None
        else:
            end = pos
            while end < n and not line[end].isspace():
                end += 1
            value = _json_or_text(line[pos:end])
        yield key, (line[pos:end], value)
        pos = end


_JSON = json.JSONDecoder()
_KEYWORD = re.compile(r"([a-z_]+)=")


def _json_or_text(word: str) -> Any:
    try:
        return json.loads(word)
    except ValueError:
        return word


def format_reply(result: Any) -> str:
    """`ok JSON`; bytes (a forward's raw logits) are written as base64 text."""
    text = json.dumps(result, ensure_ascii=False, separators=(",", ":"), default=_bytes_as_text)
    return "ok " + text + "\n"


def _bytes_as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON")


def format_error(exc: StoreError) -> str:
    """One line, whatever the message holds (a grammar parser's is several)."""
    message = " | ".join(line.strip() for line in str(exc.args[0]).splitlines() if line.strip())
    return f"error {exc.errno_name} {message}\n"


class ControlSession:
    """One open /.sys/ctl: its lines run one after another, as the opener's process.

    `waiters` bounds the reads that wait for a reply: each holds one of pyfuse3's
    request tasks until its reply comes (and FUSE reads cannot be interrupted), so past
    the bound a read that would wait gets EAGAIN. A write that leaves more than
    MAX_QUEUED lines to run waits until they are down to it, and the lines run one at a
    time with a checkpoint between them: a flood of lines through one opener neither
    grows without end nor keeps the trio loop from the socket and the mount. A write that
    would wait when too many reads and writes of /.sys/ctl wait already (in all, or of its
    uid) is EAGAIN; a line too long gets an `error E2BIG` reply in its place.
    """

    def __init__(
        self,
        syscalls: Syscalls,
        cred: Cred,
        proc: Proc,
        reading: bool,
        waiters: Waiters,
        after_call: Callable[[], Awaitable[None]],
        on_close: Callable[[], None],
    ) -> None:
        self.syscalls = syscalls
        self.reading = reading
        self.call = Call(cred, proc, _discard)
        self._waiters = waiters
        self._after_call = after_call
        self._on_close = on_close  # called once, when no line of this session runs any more
        self._partial: list[bytes] = []  # a line begun, not ended
        self._partial_len = 0
        self._skipping = False  # the rest of an over-long line is thrown away
        self._lines: deque[bytes | StoreError] = deque()  # to run, or a refusal to answer
        self._replies = bytearray()
        self._busy = False
        self._changed = trio.Event()
        self._cancel = trio.CancelScope()
        self._closed = False

    async def send(self, data: bytes) -> None:
        """Take written bytes; returns once at most MAX_QUEUED of this opener's lines wait
        to run (a write of many lines is taken whole, then waited on)."""
        self._take(data)
        if len(self._lines) <= MAX_QUEUED or self._closed:
            return
        # a waiting write holds one of the mount's request tasks, as a waiting read does:
        # both count against the same bounds (EAGAIN past them)
        uid = self.call.cred.uid
        self._waiters.enter(uid)
        try:
            while len(self._lines) > MAX_QUEUED and not self._closed:
                await self._changed.wait()
        finally:
            self._waiters.leave(uid)

    def _take(self, data: bytes) -> None:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return
            self._skipping, data = False, data[end + 1 :]
        self._partial.append(data)
        self._partial_len += len(data)
        lines: list[bytes | StoreError] = []
        if b"\n" in data:
            *ended, last = b"".join(self._partial).split(b"\n")
            self._partial, self._partial_len = [last], len(last)
            lines += [line if len(line) <= MAX_LINE else _too_long() for line in ended]
        if self._partial_len > MAX_LINE:  # answer now, skip the rest when it comes
            self._partial, self._partial_len, self._skipping = [], 0, True
            lines.append(_too_long())
        self._queue(lines)

    def _take_partial(self) -> None:
        """A last line without a newline: the writer is done with it."""
        line = b"".join(self._partial)
        self._partial, self._partial_len, self._skipping = [], 0, False
        self._queue([line])

    def _queue(self, lines: list[bytes | StoreError]) -> None:
        self._lines += [line for line in lines if not isinstance(line, bytes) or line.strip()]
        if self._lines and not self._busy:
            self._busy = True
            self._cancel = trio.CancelScope()
            self.syscalls.nursery.start_soon(self._work, self._cancel)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _work(self, cancel: trio.CancelScope) -> None:
        try:
            with cancel:
                while self._lines:
                    reply = await self._run(self._lines.popleft())
                    if self.reading:  # nobody reads a write-only opener's replies
                        self._replies += reply.encode()
                    self._wake()
                    # a call may never yield (status, kv_stat): without this, a flood of
                    # lines would keep every other task of the loop waiting
                    await trio.sleep(0)
        finally:
            self._busy = False
            self._wake()
            if self._closed:
                self._on_close()

    async def _run(self, raw: bytes | StoreError) -> str:
        if isinstance(raw, StoreError):
            return format_error(raw)
        try:
            name, args = parse_command(raw.decode())
        except UnicodeDecodeError:
            return format_error(StoreError(errno.EINVAL, "a command line must be UTF-8"))
        except StoreError as exc:
            return format_error(exc)
        if name == "forward" and "text" in args and "tokens" not in args:
            # through the tokenize call: a worker thread, and its bound on the text
            tokens = await self.syscalls.answer(self.call, "tokenize", {"text": args.pop("text")})
            if isinstance(tokens, StoreError):
                return format_error(tokens)
            args["tokens"] = tokens
        try:
            outcome = await self.syscalls.answer(self.call, name, args)
        finally:
            await self._after_call()
        return format_error(outcome) if isinstance(outcome, StoreError) else format_reply(outcome)

    async def receive(self, size: int) -> bytes:
        if self._partial_len or self._skipping:  # the writer is reading: its line ended
            self._take_partial()
        if not self._replies and self._busy:
            uid = self.call.cred.uid
            self._waiters.enter(uid)
            try:
                while not self._replies and self._busy:
                    await self._changed.wait()
            finally:
                self._waiters.leave(uid)
        out = bytes(self._replies[:size])
        del self._replies[:size]
        return out

    def close(self) -> None:
        """Opened for reading, the lines not yet answered are dropped, as for a closed
        connection; opened write-only (`echo CMD > ctl`), they run to the end, a last
        line without a newline too."""
        self._closed = True
        if self.reading:
            self._lines.clear()
            self._cancel.cancel()
        elif self._partial_len:
            self._take_partial()
        if not self._busy:
            self._on_close()


class Waiters:
    """How many reads and writes of /.sys/ctl wait (each holds a FUSE request task), in
    all and for each uid."""

    def __init__(self, total: int, per_uid: int) -> None:
        self.total, self.per_uid = total, per_uid
        self._by_uid: dict[int, int] = {}

    def enter(self, uid: int) -> None:
        """Raises: StoreError EAGAIN past either bound."""
        if sum(self._by_uid.values()) >= self.total or self._by_uid.get(uid, 0) >= self.per_uid:
            raise StoreError(errno.EAGAIN, "too many reads and writes wait on /.sys/ctl")
        self._by_uid[uid] = self._by_uid.get(uid, 0) + 1

    def leave(self, uid: int) -> None:
        self._by_uid[uid] -= 1
        if not self._by_uid[uid]:
            del self._by_uid[uid]


def _too_long() -> StoreError:
    return StoreError(errno.E2BIG, f"a command line is limited to {MAX_LINE} bytes")


async def _discard(value: Any) -> None:
    """Streamed pieces (generate's text as it comes) are not shown: the reply has all."""
