"""Samplers: nucleus and top-k bounds, min-p, bias, masks, seeds."""

from __future__ import annotations

import pytest
import torch

from symphony.engine.generate import generate
from symphony.engine.sampling import (
    GREEDY,
    SamplingParams,
    filtered_probs,
    make_generator,
    sample,
)
from symphony.engine.sampling import (
    draw as draw_one,
)

VOCAB = 50


def peaked_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=g) * 3


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    g = make_generator(seed)
    return [sample(logits[None], [params], [g])[0] for _ in range(n)]


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p_never_leaves_the_nucleus(top_p):
    for seed in range(5):
        logits = peaked_logits(seed)
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(descending=True)
        # the nucleus: the fewest top tokens whose mass reaches top_p
        size = int((sorted_probs.cumsum(0) < top_p).sum()) + 1
        nucleus = set(order[:size].tolist())
        got = draw(logits, SamplingParams(temperature=1.0, top_p=top_p), 300, seed)
        assert set(got) <= nucleus
        if size > 1:
            assert len(set(got)) > 1  # it does sample, not just take the argmax


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_leaves_the_k(k):
    logits = peaked_logits(7) / 3  # flat enough that many tokens are likely
    top = set(torch.topk(logits, k).indices.tolist())
    got = draw(logits, SamplingParams(temperature=1.5, top_k=k), 300)
    assert set(got) <= top
    assert (len(set(got)) > 1) == (k > 1)


def test_min_p_drops_unlikely_tokens():
    logits = peaked_logits(3)
    probs = torch.softmax(logits, -1)
    keep = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    got = draw(logits, SamplingParams(temperature=1.0, min_p=0.2), 300)
    assert set(got) <= keep


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = peaked_logits(1) / 4
    params = SamplingParams(temperature=1.0)
    assert draw(logits, params, 50, seed=42) == draw(logits, params, 50, seed=42)
    assert draw(logits, params, 50, seed=42) != draw(logits, params, 50, seed=43)


def test_seeded_row_ignores_the_rest_of_the_batch():
    logits = torch.stack([peaked_logits(i) / 4 for i in range(4)])
    params = [SamplingParams(temperature=1.0, top_p=0.95)] * 4
    alone = [sample(logits[2:3], params[:1], [make_generator(9)])[0] for _ in range(1)]
    gens = [make_generator(s) for s in (1, 2, 9, 4)]
    together = sample(logits, params, gens)
    assert together[2] == alone[0]


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.8)])
def test_a_row_not_finite_fails_alone(params):
    logits = torch.stack([peaked_logits(i) for i in range(7)])
    logits[1, 3] = float("nan")
    logits[2, 4] = float("inf")
    logits[3, 5] = float("-inf")
    logits[4] = float("-inf")
    logits[5, 0], logits[5, 1] = 3e38, -3e38  # finite, however large
    out = sample(logits, [params] * 7, [make_generator(i) for i in range(7)])
    assert [token is None for token in out] == [False, True, True, True, True, False, False]
    assert out[5] == 0


def test_logit_bias_and_masks():
    logits = peaked_logits(5)
    best = int(logits.argmax())
    assert sample(logits[None], [GREEDY], [None]) == [best]
    blocked = SamplingParams(temperature=0.0, blocked_token_ids=frozenset({best}))
    assert sample(logits[None], [blocked], [None])[0] != best
    allowed = SamplingParams(temperature=1.0, allowed_token_ids=frozenset({3, 4}))
    assert set(draw(logits, allowed, 100)) <= {3, 4}
    biased = SamplingParams(temperature=0.0, logit_bias={11: 100.0})
    assert sample(logits[None], [biased], [None]) == [11]
    probs = filtered_probs(logits, allowed)
    assert probs.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"allowed_token_ids": frozenset()}, "allowed"),
    ],
)
def test_bad_sampling_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(blocked_token_ids=frozenset({VOCAB})).check_vocab(VOCAB)


def test_seeded_generation_reproduces_on_the_engine(tiny_engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=123)
    prompt = tiny_engine.tokenizer.encode("hello there")
    first = generate(tiny_engine, [prompt, prompt[:4]], max_tokens=12, params=params)
    again = generate(tiny_engine, [prompt, prompt[:4]], max_tokens=12, params=params)
    assert first == again
    # the first sequence alone draws the same tokens as in the batch of two
    assert generate(tiny_engine, [prompt], max_tokens=12, params=params)[0] == first[0]


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    probs = torch.zeros(1000)
    probs[[3, 500, 998]] = torch.tensor([0.5, 0.3, 0.2])
    generator = torch.Generator().manual_seed(7)
    counts = torch.bincount(
        torch.tensor([draw_one(probs, generator) for _ in range(20000)]), minlength=1000
    )
    assert set(counts.nonzero().flatten().tolist()) == {3, 500, 998}
    # within 5 standard deviations of each expected count
    for token, p in ((3, 0.5), (500, 0.3), (998, 0.2)):
        assert abs(int(counts[token]) - 20000 * p) < 5 * (20000 * p * (1 - p)) ** 0.5
    # unnormalized mass works the same; one token with all of it is always drawn
    assert draw_one(probs * 7, torch.Generator().manual_seed(1)) in {3, 500, 998}
    assert draw_one(torch.eye(50)[49]) == 49
