"""The request bodies, as msgspec structs: a wrong type or bound is a 400 naming the
field. Fields clients send that change nothing here (user, metadata, ...) are ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from symphony.lipctl.openai_api.errors import ApiError

MAX_BODY = 4 << 20  # bytes of one request body
MAX_N = 16
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Body(msgspec.Struct, kw_only=True):
    pass


class Message(Body, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as text: a list of parts gives its text parts, joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are served", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class JsonSchema(Body, kw_only=True):
    name: str = "response"
    schema_: dict[str, Any] = msgspec.field(default_factory=dict, name="schema")
    strict: bool | None = None


class ResponseFormat(Body, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(Body, kw_only=True):
    include_usage: bool = False


class Sampling(Body, kw_only=True):
    """What chat and text completions share."""

    # null is what a client that writes every field sends for "the default"
    model: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None  # accepted, not applied
    frequency_penalty: float | None = None  # accepted, not applied
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None

    @property
    def choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def bias(self, vocab_size: int) -> dict[int, float]:
        """logit_bias by token id (the API writes the ids as strings)."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key) if key.isdigit() else -1
            if not 0 <= token < vocab_size:
                raise ApiError(
                    400, f"logit_bias keys are token ids, not {key!r}", param="logit_bias"
                )
            out[token] = value
        return out

    def sampler(self) -> tuple[float, float, int | None]:
        """temperature, top_p (0 is as good as greedy: a tiny one) and seed (any int:
        taken modulo 2**63)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else max(self.top_p, 1e-6)
        seed = None if self.seed is None else self.seed % 2**63
        return temperature, top_p, seed

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise ApiError(400, "a stop string may not be empty", param="stop")
        return stops


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[Any]  # text, token ids, or a list of one text (checked by chat.py)
    echo: bool | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    # 0 with echo and logprobs: score the prompt only (as lm-evaluation-harness does)
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = 16


def parse(raw: bytes, kind: type[Body]) -> Any:
    """The body as `kind`.

    Raises:
        ApiError: 400 naming the field that is wrong.
    """
    try:
        return msgspec.json.decode(raw, type=kind)
    except RecursionError:
        raise ApiError(400, "the body is nested too deep") from None
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = text.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in text else None
        raise ApiError(400, f"invalid request: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
