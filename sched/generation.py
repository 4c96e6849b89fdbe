"""The server-side decode loop of one `generate` call: text, stop conditions, streaming.

Each token costs the same however long the text: pieces come from tokenizers'
DecodeStream (never ending inside a UTF-8 character), stop strings are looked for only
in the tail a new piece can complete, and only what cannot still become a stop string is
streamed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import trio

from symphony.engine.tokenizer import StreamDecoder


@dataclass
class GenerateState:
    """The text so far, why it ended, and what has been streamed."""

    max_tokens: int
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    decoder: StreamDecoder
    stream: trio.MemorySendChannel[dict[str, Any]] | None
    num_logprobs: int | None = None  # None: no logprobs; else alternatives per token
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)  # the text sent (or to send) so far
    pending: str = ""  # text after it, held back: a stop string could still begin there
    emitted_ids: int = 0  # tokens of `token_ids` already streamed
    finish_reason: str | None = None

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)

    @property
    def text(self) -> str:
        """The text generated so far (joined: for the result, not for every token)."""
        return "".join(self.streamed) + self.pending

    def push(self, token: int) -> None:
        """Take one generated token (the caller appends it to the file)."""
        self.token_ids.append(token)
        if token in self.stop_token_ids:  # appended to the file, but not part of the text
            self.finish_reason = "stop"
            return
        # a stop string can only end in the new piece, so it begins in what is held back
        # (the last longest_stop - 1 characters at least) or in the piece
        self.pending += self.decoder.push(token)
        found = [i for s in self.stop_strings if (i := self.pending.find(s)) >= 0]
        if found:
            self.pending, self.finish_reason = self.pending[: min(found)], "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def stream_piece(self) -> None:
        """Send the text no stop string can still take back, with the tokens since the
        last piece; a reader that stopped listening still gets the final result."""
        hold = 0 if self.finish_reason else max(self.longest_stop - 1, 0)
        ready = self.pending[: max(0, len(self.pending) - hold)]
        ids = self.token_ids[self.emitted_ids :]
        if not ready and not (self.finish_reason and ids):
            return
        self.pending = self.pending[len(ready) :]
        self.streamed.append(ready)
        item: dict[str, Any] = {"text": ready, "token_ids": ids}
        if self.num_logprobs is not None:  # the same tokens' entries
            item["logprobs"] = self.logprobs[self.emitted_ids : len(self.token_ids)]
        self.emitted_ids = len(self.token_ids)
        if self.stream is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                self.stream.send_nowait(item)

    def result(self, file_tokens: int, error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "tokens": file_tokens,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "completion_tokens": len(self.token_ids),
            },
        }
        if self.num_logprobs is not None:
            out["logprobs"] = self.logprobs
        if error is not None:
            out["error"] = error
        return out
