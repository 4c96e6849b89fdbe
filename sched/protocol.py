"""The wire format of the syscall socket: length-prefixed msgpack frames.

Every frame is a 4-byte big-endian length, then a msgpack map. A client sends
`{"id": int, "call": str, "args": map}`; many requests may be in flight on one
connection. The server answers each with exactly one final frame,
`{"id", "ok": true, "result"}` or `{"id", "ok": false, "errno": "ENOENT", "message"}`,
possibly preceded by stream frames `{"id", "stream": value}` (generated text,
a program's output).

Ids must be unique among a connection's requests in flight: a request whose id is
already in flight is answered EINVAL (a reply with that id, so a client that reuses ids
cannot tell it from the first request's) and not run. A request that is not a map with
an integer id is answered EINVAL with id null.

A frame `{"cancel": id}` (no "call") cancels that request of the same connection. It has
no reply of its own: the request ends within one engine step and answers as its call
says (forward and verify: ECANCELED, keeping the tokens already computed; generate: its
result, finish_reason "cancelled"); calls that do not wait on the engine may just finish.
An id not in flight (unknown, finished, not an integer) is ignored. A cancel frame takes
none of the connection's request slots nor of its uid's budget. Closing the connection
cancels all its requests.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 2  # 2: forward with outputs, verify, cancel frames, results
MAX_FRAME = 16 * 1024 * 1024
# Elements of one array or map in a request: decoding a frame runs on the server's loop,
# and 16 MiB of small ints would hold it for 0.4 s (262,144 take about 6 ms).
MAX_ARRAY = 1 << 18
HEADER = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes, max_array: int = -1) -> dict[str, Any]:
    """One frame's map; `max_array` bounds every array and map in it (-1: the frame's
    size is the only bound)."""
    try:
        message = msgpack.unpackb(
            body, raw=False, strict_map_key=False, max_array_len=max_array, max_map_len=max_array
        )
    except Exception as exc:  # msgpack raises many kinds (TypeError for a list key...)
        raise FrameError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("a frame must hold a map")
    return message


class FrameBuffer:
    """Splits a byte stream into frames; `feed` bytes, then take `frames()`."""

    def __init__(self, max_frame: int = MAX_FRAME, max_array: int = -1) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._max_array = max_array
        self.sizes: list[int] = []  # the body sizes of the frames the last frames() gave

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def partial(self) -> bool:
        """Whether part of a frame is received and the rest still due."""
        return bool(self._buf)

    def frames(self) -> list[dict[str, Any]]:
        """Every whole frame received so far.

        Raises:
            FrameError: a frame is oversized or undecodable; the stream is unusable.
        """
        out = []
        self.sizes = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > self._max:
                raise FrameError(f"frame of {size} bytes exceeds {self._max}")
            if len(self._buf) < HEADER.size + size:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            out.append(decode_body(body, self._max_array))
            self.sizes.append(size)
        return out


def error_reply(request_id: Any, errno_name: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "errno": errno_name, "message": message}


def ok_reply(request_id: Any, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}
