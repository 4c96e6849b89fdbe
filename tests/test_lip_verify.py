"""Speculative verification in one call, and seeds that name random streams."""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import pytest

from symphony.lipctl import SymphonyError, connect

PROMPT = [84, 104, 101, 32, 114, 105, 118, 101, 114]


@pytest.fixture
def socket(tiny_server):
    return tiny_server.server.config.socket_path


@pytest.fixture
def lip(socket):
    with connect(socket) as lip:
        yield lip


def prompt_file(lip, path: str) -> None:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True)
    lip.call("forward", path=path, tokens=PROMPT)


def greedy(lip, path: str, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    prompt_file(lip, path)
    return lip.call("generate", path=path, max_tokens=n, sampler={"temperature": 0})["token_ids"]


def verify_loop(lip, path: str, n: int, draft_of) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy speculative decoding: `draft_of(produced)` guesses the next tokens."""
    prompt_file(lip, path)
    out: list[int] = []
    pending: list[int] = []
    while len(out) < n:
        r = lip.call("verify", path=path, tokens=pending, draft=draft_of(out))
        assert r["token_ids"] == [*draft_of(out)[: r["accepted"]], r["token"]]
        out += r["token_ids"]
        pending = [r["token"]]
        stat = lip.call("kv_stat", path=path)
        assert stat["tokens"] == len(PROMPT) + len(out) - 1  # the correction is pending
    return out[:n]


@pytest.mark.parametrize("kind", ["right", "wrong", "partly"])
def test_greedy_verification_equals_greedy_decoding(lip, kind) -> None:
    n = 24
    reference = greedy(lip, "ref.kv", n + 8)

    def draft_of(produced: list[int]) -> list[int]:
        truth = reference[len(produced) : len(produced) + 4]
        truth += [0] * (4 - len(truth))
        if kind == "right":
            return truth
        if kind == "wrong":
            return [(t + 1) % 256 for t in truth]
        return [*truth[:2], (truth[2] + 1) % 256, truth[3]]

    assert verify_loop(lip, f"{kind}.kv", n, draft_of) == reference[:n]


def test_verify_accepts_all_of_a_right_draft_in_one_step(lip) -> None:
    reference = greedy(lip, "ref.kv", 6)
    prompt_file(lip, "a.kv")
    before = lip.call("status")["steps"]
    r = lip.call("verify", path="a.kv", draft=reference[:5])
    assert lip.call("status")["steps"] == before + 1
    assert (r["accepted"], r["token"]) == (5, reference[5])


def test_verify_ahead_returns_the_greedy_tokens_past_the_rejected_guess(lip) -> None:
    """What Jacobi decoding guesses next: the argmax after each later draft token, the
    same as a forward of the rejected draft asks; nothing once all is accepted."""
    reference = greedy(lip, "ref.kv", 3)
    wrong = (reference[1] + 1) % 256
    draft = [reference[0], wrong, 7, 9]
    prompt_file(lip, "a.kv")
    r = lip.call("verify", path="a.kv", draft=draft, ahead=True)
    prompt_file(lip, "b.kv")
    asks = [{"at": [1, 2, 3], "sample": True}]
    greedy_sampler = {"temperature": 0}
    seen = lip.call("forward", path="b.kv", tokens=draft, outputs=asks, sampler=greedy_sampler)
    assert (r["accepted"], r["token"]) == (1, reference[1])
    assert r["ahead"] == [o["token"] for o in sorted(seen["outputs"], key=lambda o: o["at"])]
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT) + 1
    whole = lip.call("verify", path="a.kv", tokens=[r["token"]], draft=[reference[2]], ahead=True)
    assert (whole["accepted"], whole["ahead"]) == (1, [])
    plain = lip.call("verify", path="a.kv", tokens=[whole["token"]], draft=[wrong, 7])
    assert plain["ahead"] == []
    prompt_file(lip, "c.kv")  # under the call's logit bias, as its correction is
    biased = {"logit_bias": {5: 100.0}}
    r = lip.call("verify", path="c.kv", draft=[6, 7, 8], ahead=True, sampler=biased)
    assert (r["accepted"], r["token"], r["ahead"]) == (0, 5, [5, 5, 5])


def test_verify_refuses_bad_drafts_and_keeps_the_file(lip) -> None:
    prompt_file(lip, "a.kv")
    for args in (
        {"draft": []},
        {"draft": [1] * 65},
        {"draft": [999]},
        {"draft": [1], "draft_probs": [{2: 0.5}]},
    ):
        with pytest.raises(SymphonyError) as err:
            lip.call("verify", path="a.kv", **args)
        assert err.value.errno == "EINVAL"
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT)


def test_sampled_verification_keeps_the_target_distribution(lip) -> None:
    """Chi-square on four allowed tokens: the first token after a one-token draft (drawn
    from a uniform draft distribution) follows the target's own distribution."""
    allowed = [65, 66, 67, 68]
    prompt_file(lip, "a.kv")
    target = lip.call(
        "forward",
        path="a.kv",
        tokens=[],
        keep=False,
        outputs=[{"at": -1, "logprobs": allowed}],
    )["outputs"][0]["logprobs"]
    weights = [math.exp(lp) for _, lp in target]
    p = [w / sum(weights) for w in weights]
    sampler = {"temperature": 1.0, "allowed": allowed, "seed": 11}
    uniform = {t: 0.25 for t in allowed}
    counts = dict.fromkeys(allowed, 0)
    trials = 600
    for i in range(trials):
        guess = allowed[i % 4]  # a uniform drafter, cycling instead of drawing
        r = lip.call("verify", path="a.kv", draft=[guess], sampler=sampler, draft_probs=[uniform])
        counts[r["token_ids"][0]] += 1
        lip.call("kv_truncate", path="a.kv", n=len(PROMPT))
    expected = [trials * q for q in p]
    chi2 = sum((counts[t] - e) ** 2 / e for t, e in zip(allowed, expected, strict=True))
    assert chi2 < 16.27, (counts, p)  # df 3, p = 0.001


LOOP = """
import sys
from symphony.lipctl import connect
socket, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with connect(socket) as lip:
    lip.call("kv_open", path=path, create=True)
    token, out = 84, []
    sampler = {"temperature": 1.0, "seed": 1234}
    for _ in range(n):  # forward the last token, sample with one seed, again
        r = lip.call("forward", path=path, tokens=[token], sampler=sampler)
        token = r["token"]
        out.append(token)
print(*out)
"""


def seeded_loop(socket: str, path: str, n: int) -> list[int]:
    """A per-token program of its own (a process: a program is its pid)."""
    argv = [sys.executable, "-c", LOOP, socket, path, str(n)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    return [int(t) for t in done.stdout.split()]


def test_a_seed_is_a_stream_that_reproduces_beside_other_programs(socket) -> None:
    alone = seeded_loop(socket, "alone.kv", 20)
    assert len(set(alone)) > 5  # fresh draws each call, not the first one again
    stop = threading.Event()

    calls = []

    def noise(path: str) -> None:
        with connect(socket) as lip:
            lip.call("kv_open", path=path, create=True)
            lip.call("forward", path=path, tokens=PROMPT)
            while not stop.is_set():
                lip.call(
                    "generate",
                    path=path,
                    max_tokens=4,
                    sampler={"temperature": 1.0, "seed": 1234},
                )
                lip.call("kv_truncate", path=path, n=len(PROMPT))
                calls.append(path)

    others = [threading.Thread(target=noise, args=(f"noise{i}.kv",)) for i in range(2)]
    for t in others:
        t.start()
    try:
        beside = seeded_loop(socket, "beside.kv", 20)
    finally:
        stop.set()
        for t in others:
            t.join()
    assert beside == alone
    assert len(calls) >= 2  # the others did run beside it
