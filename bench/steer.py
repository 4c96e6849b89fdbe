"""Steering the model from a LIP (issue 10): prompt-lookup speculative decoding, `score`,
cancel latency, and the cost of a streamed token late in a long output.

Each part takes a server's socket, runs under `trio.run`, and returns a dict for
lips.json; bench/lips.py runs them (this module is not a script of its own).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import trio

from symphony.lipctl.aio import AsyncKV, AsyncLip, connect

# 187 words, 3 of them misspelt; the model copies it, mostly, fixing some
PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than two hundred years. "
    "Every night the keeper climbed the narow stairs, one hundred and twelve steps, to "
    "light the great lamp that warned the ships away from the rocks below. In the winter "
    "the wind was so strong that the whole tower seemed to shake, and the keeper wrote in "
    "his jurnal that he could hear the sea breathing under the stones. Fishermen from the "
    "village brought him bread, salt fish and news of the world, and in return he told "
    "them which way the weather would turn. When the lamp was finaly replaced by an "
    "electric light, the keeper stayed on as a guide for the visitors who came in the "
    "summer to see the view. He showed them the brass telescope, the logbooks and the "
    "small garden he had planted in the shelter of the wall, where onions, beans and "
    "roses grew side by side. He said that a lighthouse is not a building but a promise, "
    "kept one night at a time, for as long as there are ships at sea."
)
EDIT_REQUEST = f"Rewrite the following text, fixing the spelling.\n\n{PARAGRAPH}"
QUESTION = "Which of these is the capital city of Australia? Answer with the city's name."
CHOICES = [
    "The capital of Australia is Sydney.",
    "The capital of Australia is Canberra.",
    "The capital of Australia is Melbourne.",
    "It is Perth, on the west coast of the country.",
    "Brisbane, in the state of Queensland.",
    "The capital is Adelaide.",
    "Hobart, the capital of the island of Tasmania, is the answer.",
    "Darwin.",
]


def lookup_draft(context: list[int], num_prompt: int, k: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: the `k` tokens that followed, in the prompt, the latest earlier
    occurrence of the context's last n tokens (n = max_ngram..1); [] when none."""
    prompt = context[:num_prompt]
    for n in range(min(max_ngram, len(context)), 0, -1):
        tail = context[-n:]
        # the latest start whose n-gram is the tail and that has a token after it
        for start in range(num_prompt - n - 1, -1, -1):
            if prompt[start : start + n] == tail:
                return prompt[start + n : start + n + k]
    return []


def _until_stop(ids: list[int], stop_ids: set[int], limit: int) -> list[int]:
    """`ids` cut after the first stop token and at `limit` tokens, as generate ends."""
    for i, token in enumerate(ids[:limit]):
        if token in stop_ids:
            return ids[: i + 1]
    return ids[:limit]


async def speculative(socket: str, max_tokens: int, draft_len: int = 8) -> dict:
    """Greedy decoding two ways from the same chat prompt: `verify` with prompt-lookup
    drafts (a plain `forward` when no draft is found) against one server-side generate."""
    async with connect(socket) as lip:
        prompt = await lip.apply_chat_template([{"role": "user", "content": EDIT_REQUEST}])
        stop_ids = set(await lip.tokenize("<|im_end|>")) | set(await lip.tokenize("<|endoftext|>"))
        # the speculative arm first: verify appends its draft with logits, so it never
        # takes pages from the prefix index (the generate's output is not there yet)
        kv = await lip.kv("spec-lookup.kv", create=True)
        await kv.append(prompt[:-1])
        out: list[int] = []
        pending = [prompt[-1]]
        num_verify = num_forward = num_accepted = 0
        t0 = time.perf_counter()
        while len(out) < max_tokens and not stop_ids & set(out):
            draft = lookup_draft(prompt + out, len(prompt), draft_len)
            if draft:
                verified = await kv.verify(draft, tokens=pending)
                new = verified.token_ids
                num_verify += 1
                num_accepted += verified.accepted
            else:
                new = [(await kv.forward(pending, temperature=0.0)).token]
                num_forward += 1
            out += new
            pending = [new[-1]]
        spec_s = time.perf_counter() - t0
        await kv.unlink()
        spec_ids = _until_stop(out, stop_ids, max_tokens)

        kv = await lip.kv("spec-plain.kv", create=True)
        await kv.append(prompt)
        t0 = time.perf_counter()
        plain = await kv.generate(max_tokens=max_tokens, temperature=0.0)
        plain_s = time.perf_counter() - t0
        await kv.unlink()
    same = spec_ids == plain.token_ids
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(spec_ids, plain.token_ids, strict=False)) if a != b),
        min(len(spec_ids), len(plain.token_ids)),
    )
    return {
        "prompt_tokens": len(prompt),
        "generated": len(plain.token_ids),
        "finish_reason": plain.finish_reason,
        "same_tokens": same,
        "first_difference": None if same else first_diff,
        "lookup_tok_s": len(spec_ids) / spec_s,
        "generate_tok_s": len(plain.token_ids) / plain_s,
        "speedup": (len(spec_ids) / spec_s) / (len(plain.token_ids) / plain_s),
        "verify_calls": num_verify,
        "forward_calls": num_forward,
        "mean_accepted": num_accepted / max(num_verify, 1),
        "ms_per_call": 1e3 * spec_s / (num_verify + num_forward),
        "generate_ms_per_token": 1e3 * plain_s / len(plain.token_ids),
        "tokens_per_call": len(out) / (num_verify + num_forward),
    }


async def _fork_forward_logprobs(kv: AsyncKV, name: str, choice: list[int]) -> float:
    """A choice's summed logprob the way a LIP without `score` gets it: a fork, one
    forward of the choice asking each next token's logprob, then the fork unlinked."""
    fork = await kv.fork(name)
    outputs = [{"at": j - 1, "logprobs": [t]} for j, t in enumerate(choice)]
    result = await fork.forward(choice, outputs=outputs)
    await fork.unlink()
    return sum(lp for o in result.outputs for _, lp in o.logprobs or ())


async def score(socket: str, repeats: int) -> dict:
    """`kv.score` of 8 choices against 8 forks forwarded with their choice, one after
    another and all at once (concurrent calls the scheduler packs into a step)."""
    async with connect(socket) as lip:
        kv = await lip.kv("score-question.kv", create=True)
        await kv.append(await lip.apply_chat_template([{"role": "user", "content": QUESTION}]))
        choices = [await lip.tokenize(c) for c in CHOICES]

        async def one_after_another() -> list[float]:
            return [
                await _fork_forward_logprobs(kv, f"score-{i}.kv", c) for i, c in enumerate(choices)
            ]

        async def all_at_once() -> list[float]:
            sums = [0.0] * len(choices)

            async def one(i: int) -> None:
                sums[i] = await _fork_forward_logprobs(kv, f"score-{i}.kv", choices[i])

            async with trio.open_nursery() as nursery:
                for i in range(len(choices)):
                    nursery.start_soon(one, i)
            return sums

        async def scored() -> list[float]:
            return await kv.score(choices)

        times: dict[str, float] = {}
        answers: dict[str, list[float]] = {}
        for name, arm in (
            ("score", scored),
            ("forks", one_after_another),
            ("forks_concurrent", all_at_once),
        ):
            await arm()  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                answers[name] = await arm()
            times[name] = (time.perf_counter() - t0) / repeats
        await kv.unlink()
    # score answers the mean per token; the forks the sum
    means = {
        name: [s / len(c) for s, c in zip(v, choices, strict=True)] if name != "score" else v
        for name, v in answers.items()
    }
    best = {name: max(range(len(choices)), key=v.__getitem__) for name, v in means.items()}
    diff = max(abs(a - b) for a, b in zip(means["score"], means["forks"], strict=True))
    return {
        "choices": len(choices),
        "choice_tokens": [len(c) for c in choices],
        "score_ms": 1e3 * times["score"],
        "forks_ms": 1e3 * times["forks"],
        "forks_concurrent_ms": 1e3 * times["forks_concurrent"],
        "speedup": times["forks"] / times["score"],
        "speedup_vs_concurrent": times["forks_concurrent"] / times["score"],
        "same_argmax": len(set(best.values())) == 1,
        "best": CHOICES[best["score"]],
        "max_abs_diff_mean_logprob": diff,
    }


async def _busy(lip: AsyncLip) -> tuple[int, float]:
    """The server's engine steps so far and the seconds they took."""
    s = await lip.status()
    tps = s["tokens_per_second"]
    return s["steps"], s["tokens_computed"] / tps if tps else 0.0


async def cancel_latency(socket: str, others: int, repeats: int, after_s: float = 0.5) -> dict:
    """A generate cancelled (its task leaves a cancel scope) while `others` generate
    beside it: time from the cancel to the file's last growth, seen by kv_stat."""
    async with connect(socket) as lip:
        prompt = await lip.apply_chat_template(
            [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
        )
        latencies, extra_tokens = [], []
        async with trio.open_nursery() as nursery:
            for i in range(others):
                other = await lip.kv(f"cancel-other-{i}.kv", create=True)
                await other.append(prompt)
                nursery.start_soon(partial(other.generate, max_tokens=2000, temperature=0.0))
            steps0, busy0 = await _busy(lip)  # the steps of the prompts are done
            for r in range(repeats):
                kv = await lip.kv(f"cancel-{r}.kv", create=True)
                await kv.append(prompt)
                cancelled = time.perf_counter() + after_s  # when the scope cancels the call
                with trio.move_on_after(after_s) as scope:
                    await kv.generate(max_tokens=2000, temperature=0.0)
                if not scope.cancelled_caught:
                    raise RuntimeError("the generate ended before it was cancelled")
                seen = (await kv.stat())["tokens"]
                at_cancel, last_change = seen, cancelled
                while time.perf_counter() - last_change < 1.0:  # >> a step: it has stopped
                    tokens = (await kv.stat())["tokens"]
                    if tokens != seen:
                        seen, last_change = tokens, time.perf_counter()
                    await trio.sleep(0.001)
                latencies.append(last_change - cancelled)
                extra_tokens.append(seen - at_cancel)
                await kv.unlink()
            steps1, busy1 = await _busy(lip)
            nursery.cancel_scope.cancel()
        for i in range(others):
            await lip.call("kv_unlink", path=f"cancel-other-{i}.kv")
    step_ms = 1e3 * (busy1 - busy0) / (steps1 - steps0)
    mean_ms = 1e3 * statistics.mean(latencies)
    return {
        "others": others,
        "repeats": repeats,
        "latency_ms": [1e3 * x for x in latencies],
        "mean_latency_ms": mean_ms,
        "max_latency_ms": 1e3 * max(latencies),
        "tokens_after_cancel": extra_tokens,
        "mean_step_ms": step_ms,
        "latency_steps": mean_ms / step_ms,
    }


async def _plain_per_token(kv: AsyncKV, start: int, num_tokens: int, **sampler: object) -> float:
    """Seconds per token of a plain generate after the file's first `start` tokens: the
    time of `num_tokens` + 1 tokens less that of 1 (the call, the last token's logits
    computed again and the final append step cancel out)."""
    seconds = []
    for n in (1, num_tokens + 1):
        await kv.truncate(start)
        t0 = time.perf_counter()
        await kv.generate(max_tokens=n, **sampler)
        seconds.append(time.perf_counter() - t0)
    return (seconds[1] - seconds[0]) / num_tokens


async def stream_cost(
    socket: str, max_tokens: int, early: tuple[int, int], late: tuple[int, int]
) -> dict:
    """One long streamed generate (stop tokens blocked): the time per streamed token
    (client-side arrivals) in an early and a late window of generated-token indices,
    against a plain generate's time per token at the same context lengths, measured
    just before the stream for the early window and just after it for the late one (a
    shared machine's load changes over the minutes the stream takes)."""
    async with connect(socket) as lip:
        prompt = await lip.apply_chat_template(
            [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
        )
        stop_ids = sorted(
            set(await lip.tokenize("<|im_end|>")) | set(await lip.tokenize("<|endoftext|>"))
        )
        sampler = {"temperature": 0.0, "blocked": stop_ids}
        kv = await lip.kv("stream-long.kv", create=True)
        await kv.append(prompt)
        plain = {}
        fork = await kv.fork("stream-plain.kv")
        await fork.generate(max_tokens=early[0], **sampler)  # the context the window follows
        plain[early] = await _plain_per_token(
            fork, len(prompt) + early[0], early[1] - early[0], **sampler
        )
        await fork.unlink()
        arrivals: list[float] = []  # per generated token, when its piece came
        async with kv.generate_stream(max_tokens=max_tokens, **sampler) as stream:
            async for piece in stream:
                arrivals += [time.perf_counter()] * len(piece.token_ids)
        fork = await kv.fork("stream-plain.kv")  # truncated to the window's start
        plain[late] = await _plain_per_token(
            fork, len(prompt) + late[0], late[1] - late[0], **sampler
        )
        await fork.unlink()
        await kv.unlink()
    out: dict = {
        "prompt_tokens": len(prompt),
        "generated": len(stream.result.token_ids),
        "windows": {},
    }
    for a, b in (early, late):
        streamed = (arrivals[b] - arrivals[a]) / (b - a)
        out["windows"][f"{a}-{b}"] = {
            "stream_ms": 1e3 * streamed,
            "plain_ms": 1e3 * plain[a, b],
            "overhead_ms": 1e3 * (streamed - plain[a, b]),
        }
    first, last = out["windows"].values()
    out["stream_ratio"] = last["stream_ms"] / first["stream_ms"]
    out["plain_ratio"] = last["plain_ms"] / first["plain_ms"]
    return out
