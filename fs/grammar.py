"""Grammars that constrain what a KV file (or one call) may hold next, by llguidance.

A `Grammar` is a spec (JSON Schema, any JSON object, a regex or a Lark grammar) and a
matcher over the tokens since `start`, the index of the file's first constrained token.
Its state follows the file: a fork copies it, a truncate rolls it back, an append feeds
it (and is refused where it refuses a token). `Grammars` compiles specs against the
served tokenizer; compiling and long replays belong in worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from symphony.fs import kv_format
from symphony.fs.errors import StoreError

log = logging.getLogger(__name__)
KINDS = ("json_schema", "json_object", "regex", "lark")
MAX_SPEC_BYTES = 256 * 1024  # a grammar's source text, at most
# JSON as json.dumps writes it: one way to space it, so its fixed parts (keys, brackets)
# are forced and cost no sampling; a schema's "x-guidance" options override these
JSON_STYLE: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_error(message: str) -> StoreError:
    return StoreError(errno.EINVAL, f"bad grammar: {message}")


@dataclass(frozen=True)
class GrammarSpec:
    """What a grammar is, as given: `kind` (one of KINDS) and its source text (a JSON
    Schema as JSON text; empty for json_object)."""

    kind: str
    source: str = ""

    @classmethod
    def from_wire(cls, value: Any) -> GrammarSpec:
        """From `{"json_schema": {...}}`, `{"json_object": true}`, `{"regex": "..."}` or
        `{"lark": "..."}`.

        Raises:
            StoreError: EINVAL naming what is wrong.
        """
        if not isinstance(value, dict) or len(value) != 1:
            raise grammar_error(f"give exactly one of {', '.join(KINDS)} as an object's key")
        ((kind, body),) = value.items()
        if kind not in KINDS:
            raise grammar_error(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        if kind == "json_object":
            if body is not True:
                raise grammar_error("json_object takes true")
            return cls(kind)
        if kind == "json_schema":
            if not isinstance(body, (dict, bool)):
                raise grammar_error("json_schema takes a JSON Schema (an object)")
            try:  # in its order: properties are generated in it
                source = json.dumps(body)
            except (TypeError, ValueError, RecursionError):
                raise grammar_error("json_schema holds what JSON cannot hold") from None
        elif not isinstance(body, str) or not body:
            raise grammar_error(f"{kind} takes a non-empty string")
        else:
            source = body
        if len(source.encode()) > MAX_SPEC_BYTES:
            raise grammar_error(f"larger than {MAX_SPEC_BYTES} bytes")
        return cls(kind, source)

    def wire(self) -> dict[str, Any]:
        """The form `from_wire` reads."""
        if self.kind == "json_object":
            return {"json_object": True}
        if self.kind == "json_schema":
            return {"json_schema": json.loads(self.source)}
        return {self.kind: self.source}

    def llguidance_grammar(self) -> str:
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_STYLE)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, JSON_STYLE)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


def parse_record(record: Any, num_tokens: int) -> tuple[GrammarSpec, int]:
    """The spec and start of a `Grammar.record` read back (a file of `num_tokens`).

    Raises:
        StoreError: EINVAL naming what is wrong.
    """
    if not isinstance(record, dict) or set(record) != {"kind", "source", "start"}:
        raise grammar_error("a saved grammar is a map of kind, source and start")
    kind, source, start = record["kind"], record["source"], record["start"]
    if type(start) is not int or not 0 <= start <= num_tokens:
        raise grammar_error(f"a saved grammar starts at 0..{num_tokens}, not {start!r}")
    if not isinstance(source, str):
        raise grammar_error("a saved grammar's source is text")
    if kind == "json_object":
        return GrammarSpec.from_wire({kind: True}), start
    if kind == "json_schema":
        try:
            return GrammarSpec.from_wire({kind: json.loads(source)}), start
        except (ValueError, RecursionError):
            raise grammar_error("a saved JSON Schema is not JSON") from None
    return GrammarSpec.from_wire({kind: source}), start


class Grammar:
    """A spec and its matcher, fed the tokens from `start` on (`fed` of them).

    A complete grammar takes end-of-sequence tokens (`stops`) after it, as the model
    ends: those are counted in `fed` but not given to the matcher, which takes nothing
    once stopped. The engine thread computes masks while the store's thread may copy
    the matcher (a fork): a lock keeps each call on it whole (the longest is one mask).
    """

    def __init__(
        self,
        spec: GrammarSpec,
        matcher: Any,
        vocab_size: int,
        stops: frozenset[int],
        start: int = 0,
    ):
        self.spec = spec
        self._matcher = matcher
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.stops = stops
        self.start = start
        self.fed = 0
        self._ended = 0  # stop tokens fed after the matcher stopped (not given to it)
        self._record_length: tuple[int, int] | None = None  # (start, length)

    def copy(self) -> Grammar:
        with self._lock:
            twin = Grammar(
                self.spec, self._matcher.deep_copy(), self.vocab_size, self.stops, self.start
            )
            twin.fed, twin._ended = self.fed, self._ended
        return twin

    def at(self, num_tokens: int) -> Grammar:
        """A copy standing where this one stood after its file's first `num_tokens`
        tokens (an append in flight may have fed it more; before `start`, it starts
        afresh at `num_tokens`)."""
        twin = self.copy()
        if num_tokens >= twin.start:
            twin.unfeed(twin.fed - (num_tokens - twin.start))
        else:
            twin.reset(num_tokens)
        return twin

    @property
    def record(self) -> dict[str, Any]:
        """What a saved or exported file keeps of it: the spec's kind and source text
        (text: a JSON Schema's order of properties is the order they are generated in,
        and the records' JSON is written with sorted keys) and where it starts (the
        matcher's state is the file's tokens from there on)."""
        return {"kind": self.spec.kind, "source": self.spec.source, "start": self.start}

    @property
    def record_length(self) -> int:
        """The record's length as header JSON (kv_format.record_length), kept: a stat
        asks it often, and it changes only with `start`."""
        if self._record_length is None or self._record_length[0] != self.start:
            self._record_length = (self.start, kv_format.record_length(self.record))
        return self._record_length[1]

    @property
    def finished(self) -> bool:
        """Complete: only end-of-sequence tokens may follow."""
        with self._lock:
            return self._stopped()

    def _stopped(self) -> bool:
        return bool(self._ended or self._matcher.is_stopped())

    def refused(self, tokens: Sequence[int]) -> int | None:
        """The index of the first of `tokens` the grammar refuses after what it was fed
        (None: it takes them all). Changes nothing."""
        tokens = list(tokens)
        with self._lock:
            return self._first_refused(tokens)[1]

    def _first_refused(self, tokens: list[int]) -> tuple[int, int | None]:
        """(how many leading tokens the matcher takes, the first refused index). Holds
        the lock; leaves the matcher as it was."""
        outside = next((i for i, t in enumerate(tokens) if not 0 <= t < self.vocab_size), None)
        if outside is not None:  # the matcher would fail for good on such an id
            tokens = tokens[:outside]
        taken = 0 if self._stopped() else int(self._matcher.validate_tokens(tokens))
        rest = range(taken, len(tokens))
        if rest and tokens[taken] in self.stops and self._complete_after(tokens[:taken]):
            ended = next((i for i in rest if tokens[i] not in self.stops), None)
            return taken, ended if ended is not None else outside
        return taken, taken if rest else outside

    def _complete_after(self, tokens: list[int]) -> bool:
        """Whether the grammar stops after `tokens` (which it takes). Holds the lock."""
        if self._stopped() or not tokens:
            return self._stopped()
        self._matcher.consume_tokens(tokens)
        stopped = bool(self._matcher.is_stopped())
        self._matcher.rollback(len(tokens))
        return stopped

    def feed(self, tokens: Sequence[int]) -> None:
        """Take `tokens`, which `refused` accepted.

        Raises:
            StoreError: EINVAL if it refuses one after all (nothing is taken then).
        """
        tokens = list(tokens)
        if not tokens:
            return
        with self._lock:
            taken, bad = self._first_refused(tokens)
            if bad is not None:
                raise StoreError(errno.EINVAL, f"the grammar refuses token {tokens[bad]}")
            if taken and not self._matcher.consume_tokens(tokens[:taken]):
                raise StoreError(errno.EIO, f"the grammar failed: {self._matcher.get_error()}")
            self._ended += len(tokens) - taken
            self.fed += len(tokens)

    def feed_checked(self, tokens: Sequence[int], first: int) -> None:
        """Take `tokens`, the file's from index `first` on.

        Raises:
            StoreError: EINVAL naming the first it refuses (nothing is taken then).
        """
        bad = self.refused(tokens)
        if bad is not None:
            raise StoreError(
                errno.EINVAL,
                f"the grammar refuses token {tokens[bad]} at index {first + bad} of the file",
            )
        self.feed(tokens)

    def unfeed(self, n: int) -> None:
        """Forget the last `n` tokens fed (0 <= n <= fed)."""
        if not 0 <= n <= self.fed:
            raise ValueError(f"cannot take back {n} of {self.fed} tokens")
        with self._lock:
            ended = min(n, self._ended)
            self._ended -= ended
            if n > ended and not self._matcher.rollback(n - ended):
                raise StoreError(errno.EIO, f"the grammar failed: {self._matcher.get_error()}")
            self.fed -= n

    def reset(self, start: int) -> None:
        """Start again, constraining from file index `start`."""
        with self._lock:
            self._matcher.reset()
            self.fed, self._ended, self.start = 0, 0, start

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar takes next (computed without the GIL)."""
        with self._lock:
            if self._stopped():  # numpy's: no torch op in parallel off the engine thread
                stops = np.zeros(self.vocab_size, dtype=np.bool_)
                stops[sorted(self.stops)] = True
                return torch.from_numpy(stops)
            bitmask = self._matcher.compute_bitmask()
        # little-endian words of 32 bits, token i at bit i % 32 of word i // 32
        bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].view(np.bool_))

    def forced(self) -> list[int]:
        """Tokens the grammar forces next, whatever is sampled (llguidance's fast-forward
        tokens): they can be appended without sampling."""
        with self._lock:
            if self._stopped():
                return []
            return [int(t) for t in self._matcher.compute_ff_tokens()]

    def problem(self) -> str:
        with self._lock:
            return str(self._matcher.get_error())


class Grammars:
    """Compiles specs against the served tokenizer (built on first use: a real
    vocabulary takes about half a second)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_token_ids: Sequence[int]):
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._stops = sorted(stop_token_ids)
        self._tokenizer: Any = None
        self._broken: str | None = None  # why llguidance could not read the tokenizer
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build the tokenizer now (a worker thread's work at start), not on the first
        grammar a user sends; a tokenizer llguidance cannot read is logged, and every
        grammar is then ENOTSUP."""
        try:
            self._llg_tokenizer()
        except StoreError as exc:
            log.warning("grammars: %s", exc.args[0])

    def _llg_tokenizer(self) -> Any:
        """Raises:
        StoreError: ENOTSUP when llguidance cannot read the served tokenizer."""
        with self._lock:
            if self._tokenizer is None:
                if self._broken is not None:
                    raise StoreError(errno.ENOTSUP, self._broken)
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self._json, n_vocab=self.vocab_size, eos_token=self._stops or None
                    )
                except Exception as exc:  # any failure: no grammars here
                    self._broken = f"no grammars: llguidance cannot read the tokenizer ({exc})"
                    raise StoreError(errno.ENOTSUP, self._broken) from None
            return self._tokenizer

    def compile(self, spec: GrammarSpec, start: int = 0) -> Grammar:
        """A fresh matcher for `spec` (slow for a large grammar: a worker thread's work).

        Raises:
            StoreError: EINVAL with the parser's message.
        """
        try:
            source = spec.llguidance_grammar()
        except ValueError as exc:
            raise grammar_error(str(exc)) from None
        tokenizer = self._llg_tokenizer()
        try:
            matcher = llguidance.LLMatcher(tokenizer, source, log_level=0)
        except Exception as exc:  # llguidance raises only when misused; say so, not EIO
            raise grammar_error(str(exc)) from None
        if matcher.is_error():
            raise grammar_error(_first_lines(matcher.get_error()))
        return Grammar(spec, matcher, self.vocab_size, frozenset(self._stops), start)

    def replay(self, spec: GrammarSpec, start: int, tokens: Sequence[int]) -> Grammar:
        """A matcher for `spec` fed `tokens` (a file's from `start` on), as restoring or
        importing a file needs.

        Raises:
            StoreError: EINVAL when the grammar refuses one of them.
        """
        grammar = self.compile(spec, start)
        grammar.feed_checked(tokens, start)
        return grammar


def _first_lines(message: str, limit: int = 6) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    return "\n".join(lines[:limit])
