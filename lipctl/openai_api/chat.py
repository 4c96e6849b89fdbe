"""POST /v1/chat/completions and POST /v1/completions: a request in, its choices out,
as one JSON answer or as server-sent chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from symphony.lipctl.aio import AsyncLip
from symphony.lipctl.openai_api.choices import (
    MAX_GENERATE,
    Job,
    Made,
    OnPiece,
    OnReady,
    TokenTexts,
    finish_reason,
    finite,
    make_choices,
)
from symphony.lipctl.openai_api.errors import ApiError
from symphony.lipctl.openai_api.requests import ChatRequest, CompletionRequest, Message, Sampling
from symphony.lipctl.openai_api.tools import Tools, history_text, with_tools
from symphony.lipctl.results import GenerateResult, Piece, TokenLogprob

Emit = Callable[[dict[str, Any]], Awaitable[None]]  # one server-sent event's JSON


class Service:
    """The model as the API shows it, and the calls behind each endpoint."""

    def __init__(self, lip: AsyncLip, max_requests: int = 32, queue_seconds: float = 30.0) -> None:
        self.lip = lip
        # requests generating at once (one connection carries them all); the rest wait
        # this long for a turn, then are told 503
        self.running = trio.CapacityLimiter(max_requests)
        self.queue_seconds = queue_seconds
        model = lip.info["model"]
        self.model = str(model["name"])
        self.context = int(model["max_context"])
        self.vocab_size = int(model["vocab_size"])
        self.fingerprint = f"symphony-{str(model['fingerprint'])[:12]}"
        self.created = int(time.time())
        # the requests' files, in a folder of the LIP's user's own (0700)
        self.folder = f"openai-{lip.info['uid']}"
        self.texts = TokenTexts(lip)  # token ids' texts, asked once for the whole service

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "symphony",
        }

    # the two completions -------------------------------------------------------------

    async def chat(self, req: ChatRequest, emit: Emit | None) -> dict[str, Any] | None:
        self._check_model(req.model)
        tools = Tools.of(req.tools, req.tool_choice)
        messages = [_message(m) for m in req.messages]
        if tools is not None:
            messages = with_tools(messages, tools)
        prompt = await self.lip.apply_chat_template(messages)
        job = self._job(req, prompt, req.max_completion_tokens or req.max_tokens)
        job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job.grammar = _grammar(req)
        if tools is not None and tools.grammar() is not None:
            if job.grammar is not None:
                raise ApiError(
                    400,
                    "a demanded tool call and a response_format conflict",
                    param="response_format",
                )
            job.grammar = tools.grammar()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": self.model}
        head["system_fingerprint"] = self.fingerprint
        if emit is None:
            made = await self._make(job)
            choices = [
                await self._chat_choice(i, r, job, tools) for i, r in enumerate(made.results)
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": made.usage()}
        chunk = {**head, "object": "chat.completion.chunk"}
        usage = req.stream_options is not None and req.stream_options.include_usage
        tail = {"usage": None} if usage else {}

        def delta(i: int, fields: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            choice = {"index": i, "delta": fields, "logprobs": None, "finish_reason": reason}
            return {**chunk, "choices": [choice], **tail}

        async def on_ready() -> None:  # the pages are there: the stream begins
            for i in range(job.n):
                await emit(delta(i, {"role": "assistant", "content": ""}))

        held = [""] * job.n  # text not streamed yet: it may be the start of a tool call
        streaming = [tools is None] * job.n

        async def on_piece(i: int, piece: Piece) -> None:
            text = piece.text
            if not streaming[i]:  # with tools: text that cannot be a call streams on
                held[i] += text
                start = held[i].lstrip()
                if tools is None or tools.choice != "auto" or not start or start[0] == "{":
                    return
                text, held[i], streaming[i] = held[i], "", True
            if not text:
                return
            chunk = delta(i, {"content": text})
            if job.logprobs is not None and piece.logprobs:
                content = await self.texts.content(piece.logprobs, job.logprobs)
                chunk["choices"][0]["logprobs"] = {"content": content, "refusal": None}
            await emit(chunk)

        made = await self._make(job, on_piece, on_ready)
        for i, result in enumerate(made.results):
            reason = finish_reason(result)
            if tools is not None and not streaming[i]:
                call = tools.read_call(result.text)
                if call is not None:  # the call in one delta, its arguments whole
                    await emit(delta(i, {"tool_calls": [{"index": 0, **call}]}))
                    reason = "tool_calls"
                elif held[i]:
                    await emit(delta(i, {"content": held[i]}))
            await emit(delta(i, {}, reason))
        if usage:  # the last chunk before [DONE], with no choices
            await emit({**chunk, "choices": [], "usage": made.usage()})
        return None

    async def completion(self, req: CompletionRequest, emit: Emit | None) -> dict[str, Any] | None:
        self._check_model(req.model)
        text: str | None = None  # the prompt as text, or None for token ids
        if isinstance(req.prompt, str):
            text = req.prompt
        elif req.prompt and all(isinstance(p, str) for p in req.prompt):
            if len(req.prompt) != 1:
                raise ApiError(400, "one prompt a request is served", param="prompt")
            text = str(req.prompt[0])
        elif not all(type(t) is int for t in req.prompt):
            raise ApiError(400, "a prompt is text, token ids or a list of one text", param="prompt")
        ids = [int(t) for t in req.prompt] if text is None else await self.lip.tokenize(text)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        self._check_ids(ids)
        if text is None:
            text = await self.lip.detokenize(ids)
        job = self._job(req, ids, req.max_tokens)
        job.logprobs = req.logprobs
        if req.echo and req.logprobs is not None:
            job.prompt_logprobs = req.logprobs
        rid = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time())}
        head |= {"model": self.model, "system_fingerprint": self.fingerprint}
        echo = text if req.echo else ""
        if emit is None:
            made = await self._make(job)
            choices = [
                await self._text_choice(i, echo, r, job, made) for i, r in enumerate(made.results)
            ]
            return {**head, "choices": choices, "usage": made.usage()}
        usage = req.stream_options is not None and req.stream_options.include_usage
        tail = {"usage": None} if usage else {}

        def piece_of(i: int, text: str, reason: str | None = None) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [choice], **tail}

        async def on_ready() -> None:
            for i in range(job.n):
                await emit(piece_of(i, echo))

        async def on_piece(i: int, piece: Piece) -> None:
            if piece.text:
                await emit(piece_of(i, piece.text))

        made = await self._make(job, on_piece, on_ready)
        for i, result in enumerate(made.results):
            await emit(piece_of(i, "", finish_reason(result)))
        if usage:
            await emit({**head, "choices": [], "usage": made.usage()})
        return None

    # shared ------------------------------------------------------------------------

    async def _make(
        self, job: Job, on_piece: OnPiece | None = None, on_ready: OnReady | None = None
    ) -> Made:
        """make_choices, once the request has its turn.

        Raises:
            ApiError: 503 when no turn came within queue_seconds.
        """
        turn = object()
        with trio.move_on_after(self.queue_seconds) as waited:
            await self.running.acquire_on_behalf_of(turn)
        if waited.cancelled_caught:
            raise ApiError(
                503, "the server is busy with other requests; try again later", code="overloaded"
            )
        try:
            return await make_choices(self.lip, self.folder, job, on_piece, on_ready)
        finally:
            self.running.release_on_behalf_of(turn)

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model}`",
                param="model",
                code="model_not_found",
            )

    def _check_ids(self, ids: list[int]) -> None:
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ApiError(400, f"token ids are in 0..{self.vocab_size - 1}", param="prompt")

    def _job(self, req: Sampling, prompt: list[int], max_tokens: int | None) -> Job:
        room = self.context - len(prompt)
        if max_tokens is None:
            max_tokens = min(room, MAX_GENERATE)
        if max_tokens > MAX_GENERATE:
            raise ApiError(400, f"max_tokens is at most {MAX_GENERATE} here", param="max_tokens")
        if room < max_tokens or room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        self._check_ids(prompt)
        temperature, top_p, seed = req.sampler()
        job = Job(prompt, max_tokens, req.choices, temperature, top_p, seed, req.stops())
        job.logit_bias = req.bias(self.vocab_size)
        return job

    async def _chat_choice(
        self, i: int, result: GenerateResult, job: Job, tools: Tools | None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
        choice = {"index": i, "message": message, "finish_reason": finish_reason(result)}
        call = None if tools is None else tools.read_call(result.text)
        if call is not None:
            message["content"], message["tool_calls"] = None, [call]
            choice["finish_reason"] = "tool_calls"
        choice["logprobs"] = None
        if job.logprobs is not None and result.logprobs is not None:
            content = await self.texts.content(result.logprobs, job.logprobs)
            choice["logprobs"] = {"content": content, "refusal": None}
        return choice

    async def _text_choice(
        self, i: int, echo: str, result: GenerateResult, job: Job, made: Made
    ) -> dict[str, Any]:
        choice = {"index": i, "text": echo + result.text, "finish_reason": finish_reason(result)}
        choice["logprobs"] = None
        if job.logprobs is None or result.logprobs is None:
            return choice
        k = job.logprobs
        texts = self.texts
        entries = result.logprobs
        await texts.fill([*made.prompt_logprobs, *entries], k)
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        if job.prompt_logprobs is not None:  # echo: the prompt's tokens come first
            await texts.fill([TokenLogprob(job.prompt[0], 0.0, [])], 0)
            tokens.append(texts[job.prompt[0]])  # nothing predicts the first
            token_logprobs.append(None)
            top.append(None)
            entries = [*made.prompt_logprobs, *entries]
        for e in entries:
            tokens.append(texts[e.token])
            token_logprobs.append(finite(e.logprob))
            top.append({texts[t]: finite(lp) for t, lp in e.top[:k]})
        offsets, at = [], 0 if job.prompt_logprobs is not None else len(echo)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }
        return choice


def _message(message: Message) -> dict[str, str]:
    """A request's message as the chat template takes it."""
    role = "system" if message.role == "developer" else message.role
    content = history_text(message) if message.tool_calls else message.text()
    return {"role": role, "content": content}


def _grammar(req: ChatRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise ApiError(400, "json_schema needs a schema", param="response_format.json_schema")
    return {"json_schema": fmt.json_schema.schema_}
