"""The calls that compute tokens: forward, forward_many, verify and generate.

Each checks its arguments and the caller's permissions, builds the scheduler's Task(s),
and waits for them; nothing awaits between looking a file up and submitting its task,
so a file's length is the one its arguments were checked against.
"""

from __future__ import annotations

from typing import Any

import torch
import trio

from symphony.engine.batch import ranges_problem
from symphony.engine.sampling import GREEDY, SamplingParams, make_generator
from symphony.engine.tokenizer import StreamDecoder
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar
from symphony.fs.nodes import R_OK, W_OK
from symphony.sched import args as A
from symphony.sched import schema as S
from symphony.sched.calls import Call, Syscalls, syscall
from symphony.sched.generation import GenerateState
from symphony.sched.grammar_calls import compile_grammar
from symphony.sched.outputs import OutputSpec, parse_outputs
from symphony.sched.speculative import VerifyState, parse_draft_probs
from symphony.sched.tasks import Task

MAX_RANGES = 1 << 16  # attention ranges one call may give, over all its tokens
MAX_CONSTRAINED_SAMPLES = 64  # samples one forward may ask under a grammar


def forward_task(sys: Syscalls, call: Call, a: S.Forward, grammar: Grammar | None) -> Task:
    """The task of one forward's arguments (checked), `grammar` its own (compiled)."""
    vocab = sys.engine.model_config.vocab_size
    sampling = a.sampler is not None
    outputs = parse_outputs(a.outputs, len(a.tokens), sampling, vocab)
    # appending needs w; anything returned about what follows reveals the file: r too.
    # A forward that keeps nothing only reads
    want = (W_OK if a.keep else 0) | (R_OK if outputs or not a.keep else 0)
    file = sys.store.ns.lookup_file(a.path, call.cred, want)
    params = A.sampling_params(a.sampler, vocab) if sampling else None
    positions = _positions(a.positions, len(a.tokens), sys.engine.model_config.max_position)
    visible = _attention(a.attention, len(a.tokens), file.num_tokens)
    generator = _stream(sys, call, params)
    task = Task(call.proc.account, file, list(a.tokens), outputs, params, generator)
    task.positions, task.visible, task.keep = positions, visible, a.keep
    if grammar is not None:
        last = len(a.tokens) - 1
        if any(spec.sample and at != last for at, spec in outputs.items()):
            raise A.einval("a call's grammar constrains only the sample after its last token")
    _use_grammar(task, grammar)
    # each constrained sample is a mask in the step's time
    samples = sum(1 for spec in outputs.values() if spec.sample)
    if task.grammar is not None and samples > MAX_CONSTRAINED_SAMPLES:
        raise A.einval(f"at most {MAX_CONSTRAINED_SAMPLES} samples a call under a grammar")
    # only the owner's calls are fed from the owner's cache domain: another user could
    # tell what it holds from `cached` or the time a call takes
    task.reuse = call.cred.uid == file.uid
    return task


def _use_grammar(task: Task, grammar: Grammar | None) -> None:
    """The grammar the task's samples follow: the call's own, which starts after the
    call's tokens, or the file's (a copy for a computation that keeps nothing)."""
    file = task.file
    if grammar is not None:
        if file.grammar is not None:
            raise A.einval("the file has a grammar of its own; a call cannot add another")
        task.grammar, task.feed_grammar = grammar, False
    elif file.grammar is not None and (task.keep or task.samples):
        # a computation that keeps nothing and samples nothing (a score) needs none
        task.grammar = file.grammar if task.keep else file.grammar.at(file.num_tokens)


async def _grammar(sys: Syscalls, call: Call, value: Any) -> Grammar | None:
    return None if value is None else await compile_grammar(sys, call, value)


def _stream(sys: Syscalls, call: Call, params: SamplingParams | None) -> torch.Generator | None:
    """The program's random stream its sampler's seed names (None: unseeded)."""
    if params is None or params.seed is None:
        return None
    return call.proc.account.stream(params.seed, sys.engine.config.device)


def _positions(positions: list[int] | None, num_new: int, max_position: int) -> list[int] | None:
    if positions is None:
        return None
    if len(positions) != num_new:
        raise A.einval(f"{len(positions)} positions for {num_new} tokens")
    if any(not 0 <= p < max_position for p in positions):
        raise A.einval(f"positions must be in 0..{max_position - 1}")
    return positions


def _attention(
    spec: list[list[int] | None] | None, num_new: int, num_old: int
) -> list[list[int] | None] | None:
    """Per new token, the ranges [s, e) of file tokens it sees (None: causal)."""
    if spec is None:
        return None
    if len(spec) != num_new:
        raise A.einval(f"attention must list one entry per new token ({num_new})")
    visible: list[list[int] | None] = []
    total = 0
    for j, entry in enumerate(spec):
        if entry is None:
            visible.append(None)
            continue
        total += len(entry) // 2
        if total > MAX_RANGES:
            raise A.einval(f"more than {MAX_RANGES} attention ranges in one call")
        problem = ranges_problem(entry, num_old + j)
        if problem is not None:
            raise A.einval(f"attention[{j}] {problem}")
        visible.append(list(entry))
    return None if all(v is None for v in visible) else visible


@syscall("forward")
async def _forward(sys: Syscalls, call: Call, a: S.Forward) -> Any:
    grammar = await _grammar(sys, call, a.grammar)
    (result,) = await sys.run_tasks(call, [forward_task(sys, call, a, grammar)])
    return result


@syscall("forward_many")
async def _forward_many(sys: Syscalls, call: Call, a: S.ForwardMany) -> Any:
    if len(a.calls) > S.MAX_MANY:
        raise A.einval(f"forward_many takes 1..{S.MAX_MANY} calls")
    tasks = []
    grammars = []
    for i, one in enumerate(a.calls):
        try:
            grammars.append(await _grammar(sys, call, one.grammar))
        except StoreError as exc:
            raise StoreError(exc.errno, f"calls[{i}]: {exc.args[0]}") from None
    for i, one in enumerate(a.calls):  # no await from the lookups to the submit
        try:
            tasks.append(forward_task(sys, call, one, grammars[i]))
        except StoreError as exc:
            raise StoreError(exc.errno, f"calls[{i}]: {exc.args[0]}") from None
    return await sys.run_tasks(call, tasks)


@syscall("verify")
async def _verify(sys: Syscalls, call: Call, a: S.Verify) -> Any:
    vocab = sys.engine.model_config.vocab_size
    params = A.sampling_params(a.sampler, vocab) if a.sampler is not None else GREEDY
    if any(not 0 <= t < vocab for t in a.draft):
        raise A.einval(f"draft token ids must be in 0..{vocab - 1}")
    draft_probs = None
    if a.draft_probs is not None:
        draft_probs = parse_draft_probs(a.draft_probs, a.draft, vocab)
    grammar = await _grammar(sys, call, a.grammar)
    file = sys.store.ns.lookup_file(a.path, call.cred, W_OK | R_OK)
    generator = _stream(sys, call, params)
    state = VerifyState(list(a.draft), len(a.tokens) - 1, draft_probs, ahead=a.ahead)
    tokens = [*a.tokens, *a.draft]
    task = Task(call.proc.account, file, tokens, {}, params, generator, verify=state)
    task.reuse = call.cred.uid == file.uid  # as forward's: the owner's cache is the owner's
    _use_grammar(task, grammar)
    (result,) = await sys.run_tasks(call, [task])
    return result


@syscall("generate")
async def _generate(sys: Syscalls, call: Call, a: S.Generate) -> Any:
    grammar = await _grammar(sys, call, a.grammar)
    file = sys.store.ns.lookup_file(a.path, call.cred, W_OK | R_OK)
    params = A.sampling_params(a.sampler, sys.engine.model_config.vocab_size)
    stop_strings = [s for s in a.stop if isinstance(s, str)]
    stop_ids = [s for s in a.stop if isinstance(s, int)]
    if "" in stop_strings:
        raise A.einval("a stop string may not be empty")
    max_tokens, num_logprobs = a.max_tokens, a.logprobs
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
    streaming = a.stream
    generator = None
    if params.seed is not None:  # a generate call is one draw sequence: the same seed,
        generator = make_generator(params.seed, sys.engine.config.device)  # the same text
    # the first token follows the file's last: its logits are computed again
    spec = OutputSpec(sample=True, logprob=num_logprobs is not None, top_k=num_logprobs or 0)
    task = Task(call.proc.account, file, [], {-1: spec}, params, generator, generate=state)
    _use_grammar(task, grammar)
    if task.grammar is not None and not file.busy and task.grammar.finished:  # complete
        state.finish_reason = "stop"
        return state.result(file.num_tokens)
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
