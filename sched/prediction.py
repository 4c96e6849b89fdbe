"""The calls that compute tokens: forward, forward_many, verify and generate.

Each checks its arguments and the caller's permissions, builds the scheduler's Task(s),
and waits for them; nothing awaits between looking a file up and submitting its task,
so a file's length is the one its arguments were checked against.
"""

from __future__ import annotations

from typing import Any

import trio

from symphony.engine.sampling import GREEDY, make_generator
from symphony.engine.tokenizer import StreamDecoder
from symphony.fs.errors import StoreError
from symphony.fs.nodes import R_OK, W_OK
from symphony.sched import args as A
from symphony.sched.calls import Call, Syscalls, syscall
from symphony.sched.generation import GenerateState
from symphony.sched.outputs import OutputSpec, parse_outputs
from symphony.sched.speculative import MAX_DRAFT, VerifyState, parse_draft_probs
from symphony.sched.tasks import Task

MAX_GENERATE = 8192
MAX_MANY = 64  # forwards in one forward_many
MAX_RANGES = 1 << 16  # attention ranges one call may give, over all its tokens
MAX_LOGPROBS = 20  # alternatives per generated token

_FORWARD_ARGS = {"path", "tokens", "positions", "attention", "outputs", "sampler", "keep"}


def _old_forms(args: dict[str, Any]) -> None:
    """Arguments of the old forward, named with their new forms."""
    if "mask" in args:
        raise A.einval(
            "forward takes no 'mask' now: a token filter is the sampler's 'allowed' list "
            "('attention' is the mask over the context)"
        )
    if "logprobs" in args:
        raise A.einval(
            "forward takes no 'logprobs' now: ask outputs=[{'top_k': k}] (or "
            "{'logprobs': [ids]} for chosen ids)"
        )
    if bad := set(args) - _FORWARD_ARGS:
        raise A.einval(f"forward has no argument {sorted(map(str, bad))[0]!r}")


def forward_task(sys: Syscalls, call: Call, args: Any) -> Task:
    """The task of one forward's arguments (checked)."""
    if not isinstance(args, dict):
        raise A.einval("a forward's arguments must be a map")
    _old_forms(args)
    tokens = A.int_list(args, "tokens")
    sampler = args.get("sampler")
    vocab = sys.engine.model_config.vocab_size
    outputs = parse_outputs(args.get("outputs"), len(tokens), sampler is not None, vocab)
    keep = A.get(args, "keep", bool, True)
    # appending needs w; anything returned about what follows reveals the file: r too.
    # A forward that keeps nothing only reads
    want = (W_OK if keep else 0) | (R_OK if outputs or not keep else 0)
    file = sys.store.ns.lookup_file(A.get(args, "path", str), call.cred, want)
    params = A.sampling_params(sampler, vocab) if sampler is not None else None
    positions = _positions(args, len(tokens), sys.engine.model_config.max_position)
    visible = _attention(args, len(tokens), file.num_tokens)
    generator = None
    if params is not None and params.seed is not None:
        generator = call.proc.account.stream(params.seed, sys.engine.config.device)
    task = Task(call.proc.account, file, tokens, outputs, params, generator)
    task.positions, task.visible, task.keep = positions, visible, keep
    return task


def _positions(args: dict[str, Any], num_new: int, max_position: int) -> list[int] | None:
    if args.get("positions") is None:
        return None
    positions = A.int_list(args, "positions")
    if len(positions) != num_new:
        raise A.einval(f"{len(positions)} positions for {num_new} tokens")
    if any(not 0 <= p < max_position for p in positions):
        raise A.einval(f"positions must be in 0..{max_position - 1}")
    return positions


def _attention(args: dict[str, Any], num_new: int, num_old: int) -> list[list[int] | None] | None:
    """Per new token, the ranges [s, e) of file tokens it sees (None: causal)."""
    spec = args.get("attention")
    if spec is None:
        return None
    if not isinstance(spec, list) or len(spec) != num_new:
        raise A.einval(f"attention must list one entry per new token ({num_new})")
    visible: list[list[int] | None] = []
    total = 0
    for j, entry in enumerate(spec):
        if entry is None:
            visible.append(None)
            continue
        own = num_old + j
        if not isinstance(entry, list) or not entry or len(entry) % 2:
            raise A.einval(f"attention[{j}] must be null or a flat list [start, end, ...]")
        if not all(type(v) is int for v in entry):
            raise A.einval(f"attention[{j}] must hold token indices")
        total += len(entry) // 2
        if total > MAX_RANGES:
            raise A.einval(f"more than {MAX_RANGES} attention ranges in one call")
        last = 0
        for s, e in zip(entry[::2], entry[1::2], strict=True):
            if not last <= s < e <= own + 1:
                raise A.einval(
                    f"attention[{j}]: ranges must be sorted, disjoint, non-empty and within "
                    f"0..{own + 1} (a token sees only what comes before it, and itself)"
                )
            last = e
        if entry[-1] != own + 1:
            raise A.einval(f"attention[{j}] must include the token itself (index {own})")
        visible.append(list(entry))
    return None if all(v is None for v in visible) else visible


@syscall("forward")
async def _forward(sys: Syscalls, call: Call, args: dict[str, Any]) -> Any:
    (result,) = await sys.run_tasks(call, [forward_task(sys, call, args)])
    return result


@syscall("forward_many")
async def _forward_many(sys: Syscalls, call: Call, args: dict[str, Any]) -> Any:
    calls = A.get(args, "calls", list)
    if not 1 <= len(calls) <= MAX_MANY:
        raise A.einval(f"forward_many takes 1..{MAX_MANY} calls")
    tasks = []
    for i, one in enumerate(calls):
        try:
            tasks.append(forward_task(sys, call, one))
        except StoreError as exc:
            raise StoreError(exc.errno, f"calls[{i}]: {exc.args[0]}") from None
    return await sys.run_tasks(call, tasks)


@syscall("verify")
async def _verify(sys: Syscalls, call: Call, args: dict[str, Any]) -> Any:
    tokens = A.int_list(args, "tokens", [])
    draft = A.int_list(args, "draft")
    if not 1 <= len(draft) <= MAX_DRAFT:
        raise A.einval(f"a draft holds 1..{MAX_DRAFT} tokens")
    vocab = sys.engine.model_config.vocab_size
    sampler = args.get("sampler")
    params = A.sampling_params(sampler, vocab) if sampler is not None else GREEDY
    draft_probs = None
    if args.get("draft_probs") is not None:
        draft_probs = parse_draft_probs(args["draft_probs"], draft, vocab)
    file = sys.store.ns.lookup_file(A.get(args, "path", str), call.cred, W_OK | R_OK)
    if any(not 0 <= t < vocab for t in draft):
        raise A.einval(f"draft token ids must be in 0..{vocab - 1}")
    generator = None
    if params.seed is not None:
        generator = call.proc.account.stream(params.seed, sys.engine.config.device)
    state = VerifyState(draft, len(tokens) - 1, draft_probs)
    task = Task(call.proc.account, file, tokens + draft, {}, params, generator, verify=state)
    (result,) = await sys.run_tasks(call, [task])
    return result


@syscall("generate")
async def _generate(sys: Syscalls, call: Call, args: dict[str, Any]) -> Any:
    file = sys.store.ns.lookup_file(A.get(args, "path", str), call.cred, W_OK | R_OK)
    max_tokens = A.get(args, "max_tokens", int, 256)
    if not 1 <= max_tokens <= MAX_GENERATE:
        raise A.einval(f"max_tokens must be in 1..{MAX_GENERATE}")
    params = A.sampling_params(args.get("sampler"), sys.engine.model_config.vocab_size)
    stop = A.get(args, "stop", list, [])
    stop_strings = [s for s in stop if isinstance(s, str)]
    stop_ids = [s for s in stop if isinstance(s, int) and not isinstance(s, bool)]
    if len(stop_strings) + len(stop_ids) != len(stop):
        raise A.einval("stop must be a list of strings and token ids")
    if "" in stop_strings:
        raise A.einval("a stop string may not be empty")
    num_logprobs = A.get(args, "logprobs", int, None)
    if num_logprobs is not None and not 0 <= num_logprobs <= MAX_LOGPROBS:
        raise A.einval(f"logprobs must be in 0..{MAX_LOGPROBS}")
    tokenizer = sys.engine.tokenizer
    send, receive = trio.open_memory_channel[dict[str, Any]](max_tokens + 1)
    state = GenerateState(
        max_tokens=max_tokens,
        stop_token_ids=tokenizer.stop_token_ids | frozenset(stop_ids),
        stop_strings=tuple(stop_strings),
        decoder=StreamDecoder(tokenizer),
        stream=send,
        num_logprobs=num_logprobs,
        prompt_tokens=file.num_tokens,
        cached_tokens=file.cached_tokens,
    )
    streaming = A.get(args, "stream", bool, False)
    generator = None
    if params.seed is not None:  # a generate call is one draw sequence: the same seed,
        generator = make_generator(params.seed, sys.engine.config.device)  # the same text
    # the first token follows the file's last: its logits are computed again
    spec = OutputSpec(sample=True, logprob=num_logprobs is not None, top_k=num_logprobs or 0)
    task = Task(call.proc.account, file, [], {-1: spec}, params, generator, generate=state)
    sys.scheduler.submit(task)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sys.cancel_on_request, call, [task])
            async with receive:
                async for piece in receive:  # ends when the scheduler closes the channel
                    if streaming:
                        await call.stream(piece)
            await task.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        sys.scheduler.cancel(task)
    if task.error is not None:
        raise task.error
    return task.result
