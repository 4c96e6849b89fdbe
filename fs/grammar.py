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
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from symphony.fs.errors import StoreError

KINDS = ("json_schema", "json_object", "regex", "lark")
MAX_SPEC_BYTES = 256 * 1024  # a grammar's source text, at most
_BITS = torch.arange(32, dtype=torch.int32)
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
            source = json.dumps(body)  # in its order: properties are generated in it
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

    The engine thread computes masks while the store's thread may copy the matcher (a
    fork): a lock keeps each call on it whole (the longest is one mask, microseconds).
    """

    def __init__(self, spec: GrammarSpec, matcher: Any, vocab_size: int, start: int = 0):
        self.spec = spec
        self._matcher = matcher
        self._lock = threading.Lock()
        self.vocab_size = vocab_size
        self.start = start
        self.fed = 0

    def copy(self) -> Grammar:
        with self._lock:
            twin = Grammar(self.spec, self._matcher.deep_copy(), self.vocab_size, self.start)
            twin.fed = self.fed
        return twin

    @property
    def record(self) -> dict[str, Any]:
        """What a saved or exported file keeps of it: the spec's kind and source text
        (text: a JSON Schema's order of properties is the order they are generated in,
        and the records' JSON is written with sorted keys) and where it starts (the
        matcher's state is the file's tokens from there on)."""
        return {"kind": self.spec.kind, "source": self.spec.source, "start": self.start}

    def copy_at(self, num_tokens: int) -> Grammar:
        """A copy standing where this one stood after its file's first `num_tokens`
        tokens (an append in flight may have fed it more)."""
        twin = self.copy()
        twin.unfeed(twin.fed - (num_tokens - twin.start))
        return twin

    @property
    def finished(self) -> bool:
        """Nothing but an end-of-sequence token may follow."""
        with self._lock:
            return bool(self._matcher.is_stopped())

    def refused(self, tokens: Sequence[int]) -> int | None:
        """The index of the first of `tokens` the grammar refuses after what it was fed
        (None: it takes them all). Changes nothing."""
        tokens = list(tokens)
        if not tokens:
            return None
        with self._lock:
            n = int(self._matcher.validate_tokens(tokens))
        return None if n == len(tokens) else n

    def feed(self, tokens: Sequence[int]) -> None:
        """Take `tokens`, which `refused` accepted."""
        if tokens:
            with self._lock:
                ok = self._matcher.consume_tokens(list(tokens))
                assert ok, self._matcher.get_error()
                self.fed += len(tokens)

    def unfeed(self, n: int) -> None:
        """Forget the last `n` tokens fed."""
        if n:
            assert 0 < n <= self.fed, (n, self.fed)
            with self._lock:
                ok = self._matcher.rollback(n)
                assert ok, self._matcher.get_error()
                self.fed -= n

    def reset(self, start: int) -> None:
        """Start again, constraining from file index `start`."""
        with self._lock:
            self._matcher.reset()
            self.fed, self.start = 0, start

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar takes next (computed without the GIL)."""
        with self._lock:
            mask = self._matcher.compute_bitmask()
        words = torch.frombuffer(bytearray(mask), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> _BITS) & 1
        return bits.flatten()[: self.vocab_size].bool()

    def forced(self) -> list[int]:
        """Tokens the grammar forces next, whatever is sampled (llguidance's fast-forward
        tokens): they can be appended without sampling."""
        with self._lock:
            return [int(t) for t in self._matcher.compute_ff_tokens()]

    def problem(self) -> str:
        with self._lock:
            return str(self._matcher.get_error())


def after_drop(grammar: Grammar, token_ids: Sequence[int], start: int, end: int) -> Grammar:
    """The grammar of a file whose tokens [start, end) go (0 <= start < end <= its
    length): before its start, it moves down; over its tokens, a copy is fed again from
    the range on (from the range's start, if the range began before it).

    Raises:
        StoreError: EINVAL when the grammar refuses the tokens left.
    """
    gone = end - start
    twin = grammar.copy_at(len(token_ids))
    if end <= grammar.start:
        twin.start -= gone
        return twin
    if start <= grammar.start:
        twin.reset(start)
    else:
        twin.unfeed(twin.fed - (start - grammar.start))
    tail = list(token_ids[end:])
    bad = twin.refused(tail)
    if bad is not None:
        raise StoreError(
            errno.EINVAL,
            f"the file's grammar refuses what the drop leaves: token {tail[bad]} "
            f"at index {start + bad}",
        )
    twin.feed(tail)
    return twin


class Grammars:
    """Compiles specs against the served tokenizer (built on first use: a real
    vocabulary takes about half a second)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_token_ids: Sequence[int]):
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._stops = sorted(stop_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build the tokenizer now (a worker thread's work at start), not on the first
        grammar a user sends."""
        self._llg_tokenizer()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._json, n_vocab=self.vocab_size, eos_token=self._stops or None
                )
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
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), source, log_level=0)
        if matcher.is_error():
            raise grammar_error(_first_lines(matcher.get_error()))
        return Grammar(spec, matcher, self.vocab_size, start)

    def replay(self, spec: GrammarSpec, start: int, tokens: Sequence[int]) -> Grammar:
        """A matcher for `spec` fed `tokens` (a file's from `start` on), as restoring or
        importing a file needs.

        Raises:
            StoreError: EINVAL when the grammar refuses one of them.
        """
        grammar = self.compile(spec, start)
        bad = grammar.refused(tokens)
        if bad is not None:
            raise StoreError(
                errno.EINVAL,
                f"the grammar refuses token {tokens[bad]} at index {start + bad} of the file",
            )
        grammar.feed(tokens)
        return grammar


def _first_lines(message: str, limit: int = 6) -> str:
    lines = [line for line in message.splitlines() if line.strip()]
    return "\n".join(lines[:limit])
