"""A hostile tenant's samplers and broken contexts fail only their own calls.

Each poisoned call runs next to a healthy greedy generate of another user's file; the
healthy one must finish with the same tokens as when it runs alone.
"""

from __future__ import annotations

import math
import threading

import pytest

from symphony.lipctl import SymphonyError, connect
from tests.server_helpers import ServerThread

VOCAB = 259  # the tiny model's


@pytest.fixture
def server(tiny_server):
    return tiny_server


def greedy_ids(lip, path: str, n: int, **sampler: float) -> list[int]:  # type: ignore[no-untyped-def]
    sampler = sampler or {"temperature": 0.0}
    return lip.call("generate", path=path, max_tokens=n, sampler=sampler)["token_ids"]


def healthy_generate(socket: str, path: str, out: list) -> None:
    with connect(socket) as lip:
        kv = lip.kv(path)
        kv.truncate(5)
        out.append(greedy_ids(lip, path, 24))


def alone_and_beside(server: ServerThread, poison) -> tuple[list, list, list]:  # type: ignore[no-untyped-def]
    """The healthy generate alone, then again while `poison(lip)` runs; and what the
    poisoned calls raised."""
    socket = server.server.config.socket_path
    with connect(socket) as lip:
        kv = lip.kv("healthy.kv", create=True)
        kv.append(lip.tokenize("hello"))
    alone: list = []
    healthy_generate(socket, "healthy.kv", alone)
    beside: list = []
    errors: list = []
    thread = threading.Thread(target=healthy_generate, args=(socket, "healthy.kv", beside))
    with connect(socket) as lip:
        thread.start()
        for _ in range(6):
            try:
                poison(lip)
            except SymphonyError as exc:
                errors.append(exc.errno)
        thread.join(60)
    server.run_sync(server.server.store.check_invariants)
    return alone, beside, errors


BAD_SAMPLERS = [
    {"temperature": math.nan},
    {"temperature": math.inf},
    {"temperature": -0.5},
    {"top_p": math.nan},
    {"min_p": math.nan},
    {"logit_bias": {5: math.inf}},
    {"logit_bias": {5: -math.inf}},
    {"logit_bias": {5: math.nan}},
    {"logit_bias": {5: 1e30}},
    {"blocked": list(range(VOCAB))},
    {"allowed": [3], "blocked": [3]},
    {"seed": -1},
]


@pytest.mark.parametrize("sampler", BAD_SAMPLERS, ids=lambda s: repr(s)[:40])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_a_bad_sampler_is_einval_and_harms_no_neighbour(server, sampler, call):
    def poison(lip):  # type: ignore[no-untyped-def]
        lip.kv("mine.kv", create=True)
        if call == "generate":
            lip.call("kv_truncate", path="mine.kv", n=0)
            lip.call("forward", path="mine.kv", tokens=[1, 2, 3])
            lip.call("generate", path="mine.kv", max_tokens=8, sampler=sampler)
        else:
            lip.call("forward", path="mine.kv", tokens=[1, 2, 3], sampler=sampler)

    alone, beside, errors = alone_and_beside(server, poison)
    assert beside == alone
    assert errors == ["EINVAL"] * 6


def test_a_tiny_temperature_is_the_greedy_limit(server):
    socket = server.server.config.socket_path
    with connect(socket) as lip:
        kv = lip.kv("t.kv", create=True)
        kv.append(lip.tokenize("hello"))
        kv.fork("g.kv")
        greedy = greedy_ids(lip, "g.kv", 12)
        tiny = greedy_ids(lip, "t.kv", 12, temperature=1e-45, seed=3)
    assert tiny == greedy


def test_a_context_with_non_finite_kv_fails_alone(server):
    """Pages holding NaN (however they got there) fail the calls that read them, with
    EINVAL, and nobody else's; the file is left as it was."""
    socket = server.server.config.socket_path
    with connect(socket) as lip:
        kv = lip.kv("nan.kv", create=True)  # made first: its pages are the pool's lowest
        kv.append(lip.tokenize("poisoned context"))
    store, pool = server.server.store, server.server.engine.pool

    file = server.run_sync(lambda: store.ns.nodes[store.ns.root.children["nan.kv"]])
    for layer in range(len(pool.k_cache)):
        pool.k_cache[layer][file.pages] = math.nan
        pool.v_cache[layer][file.pages] = math.nan
    tokens_before = list(file.token_ids)

    def poison(lip):  # type: ignore[no-untyped-def]
        lip.call("generate", path="nan.kv", max_tokens=8, sampler={"temperature": 0.7})

    alone, beside, errors = alone_and_beside(server, poison)
    assert beside == alone
    assert errors == ["EINVAL"] * 6
    assert file.token_ids == tokens_before
    with connect(socket) as lip, pytest.raises(SymphonyError) as info:
        lip.kv("nan.kv").forward([5], outputs=[{"top_k": 3}])
    assert info.value.errno == "EINVAL"
