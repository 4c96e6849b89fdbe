"""Every syscall's arguments, described once as msgspec structs.

The server checks each call's arguments against its struct (`args.parse`): types,
required fields, unknown fields and simple bounds are refused there with EINVAL naming
the field; what depends on the model or the store (token ids in the vocabulary, a path's
permissions) is the handlers'. `CALLS` pairs each call with its arguments, its result
(`sched/results.py`, the structs the clients decode answers with) and one line;
`protocol_table.py` makes docs/protocol.md from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from symphony.fs.kv_concat import MAX_SOURCES
from symphony.sched import results as R

MAX_TEXT = 1 << 20  # characters one tokenize or chat template call takes
MAX_IDS = 1 << 16  # token ids one detokenize call takes
MAX_GENERATE = 8192
MAX_MANY = 64  # forwards in one forward_many
MAX_DRAFT = 64
MAX_TOP_K = 100
MAX_LOGPROBS = 20  # alternatives per generated token


def doc(text: str, **bounds: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **bounds)


Path = Annotated[str, doc("a path in the store, like demo/a.kv")]
TokenIds = list[int]


class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Arguments of a call (an unknown field is refused)."""


class NoArgs(Args):
    pass


class Sampler(Args):
    """How a token is drawn; temperature 0 is greedy."""

    temperature: Annotated[float, doc("0: greedy")] = 1.0
    top_k: Annotated[int, doc("0: off", ge=0)] = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Annotated[int | None, doc("names a random stream of the program")] = None
    logit_bias: Annotated[dict[int, float], doc("token id: bias in [-100, 100]")] = {}
    allowed: Annotated[TokenIds | None, doc("only these ids may be drawn")] = None
    blocked: Annotated[TokenIds, doc("these ids are never drawn")] = []


class OutputAsk(Args):
    """What to return about the prediction after new token(s) `at`."""

    at: Annotated[int | list[int] | None, doc("new-token index (-1: the file's last token)")] = None
    sample: Annotated[bool, doc("a token drawn with the call's sampler")] = False
    logprob: Annotated[bool, doc("the drawn token's logprob")] = False
    logprobs: Annotated[TokenIds, doc("logprobs of these ids")] = []
    top_k: Annotated[int, doc("the k likeliest ids", ge=0, le=MAX_TOP_K)] = 0
    entropy: bool = False
    logits: Annotated[bool, doc("raw fp32 logits as bytes")] = False


Ranges = Annotated[list[int] | None, doc("null (causal) or [start, end, start, end, ...]")]
Grammar = Annotated[
    dict[str, Any] | None,
    doc('{"json_schema": {..}}, {"json_object": true}, {"regex": ".."} or {"lark": ".."}'),
]


class Forward(Args):
    path: Path
    tokens: Annotated[TokenIds, doc("appended and computed")]
    positions: Annotated[TokenIds | None, doc("RoPE position per new token")] = None
    attention: Annotated[list[Ranges] | None, doc("per new token: what it sees")] = None
    outputs: list[OutputAsk] | None = None
    sampler: Sampler | None = None
    keep: Annotated[bool, doc("false: compute, answer, append nothing")] = True
    grammar: Annotated[Grammar, doc("constrains the sample after the tokens")] = None


class ForwardMany(Args):
    calls: Annotated[list[Forward], doc("forwards on distinct files", min_length=1)]


class Verify(Args):
    path: Path
    draft: Annotated[TokenIds, doc("guesses", min_length=1, max_length=MAX_DRAFT)]
    tokens: Annotated[TokenIds, doc("known next tokens (the pending one)")] = []
    sampler: Sampler | None = None
    draft_probs: Annotated[
        list[dict[int, float]] | None, doc("per draft token: the drafter's {id: prob}")
    ] = None
    grammar: Annotated[Grammar, doc("constrains the draft and the next token")] = None
    ahead: Annotated[
        bool, doc("also return the likeliest token after each rejected draft token and later")
    ] = False


class Generate(Args):
    path: Path
    max_tokens: Annotated[int, doc("tokens to generate at most", ge=1, le=MAX_GENERATE)] = 256
    sampler: Sampler | None = None
    stop: Annotated[list[str | int], doc("stop strings and token ids")] = []
    stream: Annotated[bool, doc("stream {text, token_ids} pieces")] = False
    logprobs: (
        Annotated[int, doc("per token: its logprob and this many alternatives", ge=0, le=20)] | None
    ) = None
    grammar: Annotated[Grammar, doc("constrains the generated tokens")] = None


class Tokenize(Args):
    text: Annotated[str, doc(f"at most {MAX_TEXT} characters (E2BIG)")]
    special: Annotated[bool, doc("control tokens written in the text count")] = True


class Detokenize(Args):
    ids: Annotated[TokenIds, doc(f"at most {MAX_IDS} ids (E2BIG)")]
    skip_special: bool = False


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str


class ChatTemplate(Args):
    messages: list[Message]
    add_generation_prompt: bool = True
    special: Annotated[bool, doc("control tokens in contents count")] = False


class KvOpen(Args):
    path: Path
    create: bool = False
    exclusive: bool = False
    mode: int = 0o600


class KvPath(Args):
    path: Path


class KvFork(Args):
    src: Path
    dst: Path
    mode: Annotated[int | None, doc("default: the source's")] = None


class KvTruncate(Args):
    path: Path
    n: Annotated[int, doc("tokens kept")]


class KvConstrain(Args):
    path: Path
    grammar: Annotated[Grammar, doc("what follows must match it; null: free the file")]


class KvDrop(Args):
    path: Path
    start: Annotated[int, doc("the first token removed")]
    end: Annotated[int, doc("the token after the last removed")]
    reposition: Annotated[bool, doc("the rest move down to close the gap, keys re-rotated")] = False


class KvConcat(Args):
    dst: Annotated[Path, doc("the new file (EEXIST if it exists)")]
    srcs: Annotated[list[Path], doc("its pieces, in order", min_length=1, max_length=MAX_SOURCES)]
    reposition: Annotated[bool, doc("each piece follows the one before, keys re-rotated")] = True
    mode: int = 0o600


class Mkdir(Args):
    path: Path
    mode: int = 0o755
    parents: bool = False


class Listdir(Args):
    path: str = ""


class Spawn(Args):
    program: Annotated[str, doc("the program's Python source")]
    args: list[str] = []
    name: str = "program.py"
    env: dict[str, str] = {}
    limits: Annotated[dict[str, Any], doc("cpu_seconds, address_space, ... priority")] = {}


class Pid(Args):
    pid: int


@dataclass(frozen=True)
class CallSpec:
    args: type[Args]
    result: Any  # a results struct, or a plain type
    doc: str
    stream: Any = None  # what stream frames carry, if any


CALLS: dict[str, CallSpec] = {
    "hello": CallSpec(NoArgs, dict[str, Any], "protocol, model, limits, pid, uid"),
    "tokenize": CallSpec(Tokenize, list[int], "text to token ids"),
    "detokenize": CallSpec(Detokenize, str, "token ids to text"),
    "apply_chat_template": CallSpec(ChatTemplate, list[int], "messages to token ids"),
    "kv_open": CallSpec(KvOpen, R.Stat, "open (or create) a KV file"),
    "kv_stat": CallSpec(KvPath, R.Stat, "a file's tokens, pages, sharing, owner, origin"),
    "kv_fork": CallSpec(KvFork, R.Stat, "a copy-on-write copy sharing every page"),
    "kv_truncate": CallSpec(KvTruncate, R.Stat, "roll back to the first n tokens"),
    "kv_verify": CallSpec(KvPath, dict[str, Any], "recompute a file, report its deviation"),
    "kv_constrain": CallSpec(KvConstrain, R.Stat, "attach a grammar to a file's next tokens"),
    "kv_drop": CallSpec(KvDrop, R.Stat, "remove tokens [start, end) from the middle"),
    "kv_concat": CallSpec(KvConcat, R.Stat, "a new file of several files' tokens in order"),
    "kv_unlink": CallSpec(KvPath, None, "remove a name"),
    "mkdir": CallSpec(Mkdir, None, "make a directory"),
    "listdir": CallSpec(Listdir, list[str], "a directory's names"),
    "forward": CallSpec(Forward, R.ForwardResult, "append and compute tokens; outputs"),
    "forward_many": CallSpec(ForwardMany, list[R.ForwardResult], "forwards in one step"),
    "verify": CallSpec(Verify, R.VerifyResult, "speculative verification in one step"),
    "generate": CallSpec(Generate, R.GenerateResult, "server-side decode loop", R.Piece),
    "status": CallSpec(NoArgs, dict[str, Any], "pages, files, processes, engine figures"),
    "ps": CallSpec(NoArgs, list[dict[str, Any]], "the process table"),
    "spawn": CallSpec(Spawn, dict[str, int], "run a LIP on the server: {pid}"),
    "kill": CallSpec(Pid, dict[str, Any], "end a program (and its descendants)"),
    "wait": CallSpec(Pid, dict[str, Any], "a program's output, then its row", dict[str, Any]),
}
