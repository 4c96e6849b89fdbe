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
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    emitted_ids: int = 0  # tokens of `token_ids` already streamed
    finish_reason: str | None = None

    @property
    def longest_stop(self) -> int:
        return max((len(s) for s in self.stop_strings), default=0)

    def push(self, token: int) -> None:
        """Take one generated token (the caller appends it to the file)."""
        self.token_ids.append(token)
        if token in self.stop_token_ids:  # appended to the file, but not part of the text
            self.finish_reason = "stop"
            return
        # a stop string can only end in the new piece: look at the tail alone
        tail = max(0, len(self.text) - self.longest_stop + 1)
        self.text += self.decoder.push(token)
        found = [i for s in self.stop_strings if (i := self.text.find(s, tail)) >= 0]
        if found:
            self.text, self.finish_reason = self.text[: min(found)], "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"

    def stream_piece(self) -> None:
        """Send the text no stop string can still take back, with the tokens since the
        last piece; a reader that stopped listening still gets the final result."""
        hold = 0 if self.finish_reason else max(self.longest_stop - 1, 0)
        end = max(self.emitted, len(self.text) - hold)
        if (end == self.emitted and not self.finish_reason) or self.stream is None:
            return
        ids = self.token_ids[self.emitted_ids :]
        if end == self.emitted and not ids:
            return
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            self.stream.send_nowait({"text": self.text[self.emitted : end], "token_ids": ids})
        self.emitted, self.emitted_ids = end, len(self.token_ids)

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
