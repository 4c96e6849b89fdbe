"""The client library LIPs import: `connect()`, then KV files and the model through syscalls.

    from symphony.lipctl import connect

    with connect() as lip:
        kv = lip.kv("demo/prefix.kv", create=True)
        kv.append(lip.tokenize("You are a poet."))
        a = kv.fork("demo/a.kv")
        print(a.generate(max_tokens=32, temperature=0))

Imports no torch: a LIP starts in milliseconds.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Generator, Sequence
from typing import Any

from symphony.sched.protocol import FrameBuffer, encode

DEFAULT_SOCKET = "/tmp/symphony.sock"


class SymphonyError(Exception):
    """A syscall failed. `errno` is its name (EACCES, ENOENT, ENOSPC, EINVAL...)."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message


def socket_path(path: str | None = None) -> str:
    return path or os.environ.get("SYMPHONY_SOCKET") or DEFAULT_SOCKET


def sampler_args(
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    logit_bias: dict[int, float] | None = None,
    allowed: Sequence[int] | None = None,
    blocked: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The wire form of a sampler; fields left None take the server's defaults."""
    spec = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "seed": seed,
        "logit_bias": logit_bias,
        "allowed": None if allowed is None else list(allowed),
        "blocked": None if blocked is None else list(blocked),
    }
    return {k: v for k, v in spec.items() if v is not None}


def forward_args(
    path: str,
    token_ids: Sequence[int],
    logprobs: int,
    mask: Sequence[int] | None,
    sampler: dict[str, Any],
) -> dict[str, Any]:
    """Arguments of `forward`: sampler fields ask for a sampled next token."""
    args: dict[str, Any] = {"path": path, "tokens": list(token_ids), "logprobs": logprobs}
    if sampler:
        args["sampler"] = sampler_args(**sampler)
    if mask is not None:
        args["mask"] = list(mask)
    return args


def generate_args(
    path: str,
    max_tokens: int,
    stop: Sequence[str | int],
    sampler: dict[str, Any],
    stream: bool = False,
) -> dict[str, Any]:
    """Arguments of `generate`."""
    return {
        "path": path,
        "max_tokens": max_tokens,
        "sampler": sampler_args(**sampler),
        "stop": list(stop),
        "stream": stream,
    }


def with_mode(args: dict[str, Any], mode: int | None) -> dict[str, Any]:
    return args if mode is None else {**args, "mode": mode}


class Lip:
    """A connection to the server: one call at a time (see `aio` for many at once)."""

    def __init__(self, path: str | None = None) -> None:
        self.socket_path = socket_path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            raise SymphonyError(
                "ECONNREFUSED", f"no Symphony server at {self.socket_path}: {exc.strerror}"
            ) from None
        self._ids = itertools.count(1)
        self._frames = FrameBuffer()
        self._pending: list[dict[str, Any]] = []
        self.info = self.call("hello")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Lip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the wire -----------------------------------------------------------------------

    def _next_frame(self) -> dict[str, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise SymphonyError("ECONNRESET", "the server closed the connection")
            self._frames.feed(data)
            self._pending.extend(self._frames.frames())
        return self._pending.pop(0)

    def stream_call(self, call_name: str, /, **args: Any) -> Generator[Any, None, Any]:
        """Send one call; yield its stream items; return (StopIteration.value) its result."""
        rid = next(self._ids)
        self._sock.sendall(encode({"id": rid, "call": call_name, "args": args}))
        while True:
            frame = self._next_frame()
            if frame.get("id") not in (rid, None):
                continue  # a reply to a call given up on
            if "stream" in frame:
                yield frame["stream"]
                continue
            if frame.get("ok"):
                return frame.get("result")
            raise SymphonyError(frame.get("errno", "EIO"), frame.get("message", "call failed"))

    def call(self, call_name: str, /, **args: Any) -> Any:
        it = self.stream_call(call_name, **args)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    # the model ----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self.call("tokenize", text=text))

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return str(self.call("detokenize", ids=list(ids), skip_special=skip_special))

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        return list(
            self.call(
                "apply_chat_template",
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
            )
        )

    # files and programs -------------------------------------------------------------

    def kv(
        self, path: str, create: bool = False, exclusive: bool = False, mode: int | None = None
    ) -> KV:
        """Open the KV file at `path` (made empty first with `create` if missing)."""
        args = {"path": path, "create": create, "exclusive": exclusive}
        self.call("kv_open", **with_mode(args, mode))
        return KV(self, path)

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        self.call("mkdir", path=path, mode=mode, parents=parents)

    def listdir(self, path: str = "") -> list[str]:
        return list(self.call("listdir", path=path))

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def ps(self) -> list[dict[str, Any]]:
        return list(self.call("ps"))

    def spawn(
        self,
        program: str,
        args: Sequence[str] = (),
        name: str = "program.py",
        env: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> int:
        result = self.call(
            "spawn", program=program, args=list(args), name=name, env=env or {}, limits=limits or {}
        )
        return int(result["pid"])

    def kill(self, pid: int) -> dict[str, Any]:
        return dict(self.call("kill", pid=pid))

    def wait(self, pid: int) -> Generator[dict[str, Any], None, Any]:
        """Yield a program's output ({"fd", "data"}); return its process-table row."""
        return self.stream_call("wait", pid=pid)


class KV:
    """A KV file, by path."""

    def __init__(self, lip: Lip, path: str) -> None:
        self.lip = lip
        self.path = path

    def __repr__(self) -> str:
        return f"KV({self.path!r})"

    def stat(self) -> dict[str, Any]:
        """At least `tokens`, `pages` and `shared_pages`."""
        return dict(self.lip.call("kv_stat", path=self.path))

    def append(self, token_ids: Sequence[int]) -> int:
        """Prefill: append and compute `token_ids`; returns the file's token count."""
        return int(self.lip.call("forward", path=self.path, tokens=list(token_ids))["tokens"])

    def forward(
        self,
        token_ids: Sequence[int],
        logprobs: int = 0,
        mask: Sequence[int] | None = None,
        **sampler: Any,
    ) -> dict[str, Any]:
        """Append `token_ids`; with sampler fields (temperature=...) also return a sampled
        next `token` (not appended); with `logprobs=k` the k likeliest next tokens."""
        return dict(
            self.lip.call("forward", **forward_args(self.path, token_ids, logprobs, mask, sampler))
        )

    def generate_stream(
        self, max_tokens: int = 256, stop: Sequence[str | int] = (), **sampler: Any
    ) -> Generator[str, None, Any]:
        """Yield the generated text piece by piece; returns the full result at the end."""
        args = generate_args(self.path, max_tokens, stop, sampler, stream=True)
        return self.lip.stream_call("generate", **args)

    def generate(
        self, max_tokens: int = 256, stop: Sequence[str | int] = (), **sampler: Any
    ) -> str:
        """Generate (and append) up to `max_tokens`; returns the text."""
        result = self.lip.call("generate", **generate_args(self.path, max_tokens, stop, sampler))
        return str(result["text"])

    def fork(self, dst: str, mode: int | None = None) -> KV:
        """A copy-on-write copy at `dst`, sharing every page."""
        self.lip.call("kv_fork", **with_mode({"src": self.path, "dst": dst}, mode))
        return KV(self.lip, dst)

    def truncate(self, num_tokens: int) -> None:
        """Roll back to the first `num_tokens` tokens."""
        self.lip.call("kv_truncate", path=self.path, n=num_tokens)

    def unlink(self) -> None:
        self.lip.call("kv_unlink", path=self.path)

    def kv_verify(self) -> dict[str, Any]:
        """Recompute the file: `max_abs_diff` from the engine's K/V, `match`, `origin`
        (a match makes an imported file computed)."""
        return dict(self.lip.call("kv_verify", path=self.path))


def connect(path: str | None = None) -> Lip:
    """Connect to the server at `path`, else $SYMPHONY_SOCKET, else /tmp/symphony.sock."""
    return Lip(path)
