"""A hostile tenant's forwards: scratch work on a file that changes, positions past the
context, costly outputs, another user's cache domain; a masked last token recomputed."""

from __future__ import annotations

import socket
import time

import pytest

from symphony.engine.config import EngineConfig
from symphony.engine.engine import Engine
from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.lipctl import SymphonyError, connect
from symphony.sched.protocol import FrameBuffer, encode
from tests.logit_rows import logits
from tests.server_helpers import ServerThread
from tests.tiny import tiny_model_files

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108]
OTHER = Cred(65534, 65534)


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


def fresh(lip, path: str, tokens: list[int], mode: int = 0o600) -> None:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True, mode=mode)
    lip.call("forward", path=path, tokens=tokens)


def test_scratch_work_on_a_file_truncated_meanwhile_harms_nobody(lip, tiny_server) -> None:
    """keep=False leaves the file free: its owner may cut it mid-computation. The call
    answers from what the file was; the server and everyone else go on."""
    path = tiny_server.server.config.socket_path
    fresh(lip, "victim.kv", PROMPT)
    lip.call("kv_open", path="mine.kv", create=True)
    for _ in range(10):
        lip.call("kv_truncate", path="mine.kv", n=0)
        lip.call("forward", path="mine.kv", tokens=PROMPT)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.settimeout(30)
        scratch = {
            "path": "mine.kv",
            "tokens": [7] * 40,
            "keep": False,
            "outputs": [{"at": -1, "top_k": 1}, {"at": 39, "top_k": 1}],
        }
        cut = {"path": "mine.kv", "n": 0}
        sock.sendall(
            encode({"id": 1, "call": "forward", "args": scratch})
            + encode({"id": 2, "call": "kv_truncate", "args": cut})
        )
        buffer, replies = FrameBuffer(), []
        while len(replies) < 2:
            buffer.feed(sock.recv(65536))
            replies += buffer.frames()
        sock.close()
        assert all(r["ok"] for r in replies), replies
    assert lip.call("forward", path="victim.kv", tokens=[1])["tokens"] == len(PROMPT) + 1
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_positions_past_the_context_are_refused_and_fail_nobody_else(tmp_path) -> None:
    engine = Engine(
        tiny_model_files(max_position=32), EngineConfig(device="cpu", num_pages=32, page_size=4)
    )
    thread = ServerThread(engine, str(tmp_path / "p.sock")).start()
    try:
        with connect(thread.server.config.socket_path) as lip:
            fresh(lip, "far.kv", [1, 2])
            lip.call("forward", path="far.kv", tokens=[5], positions=[31])
            fresh(lip, "near.kv", [1, 2])
            with pytest.raises(SymphonyError) as info:  # the next default position is 32
                lip.call(
                    "forward_many",
                    calls=[{"path": "near.kv", "tokens": [3]}, {"path": "far.kv", "tokens": [6]}],
                )
            assert info.value.errno == "EINVAL" and "past the model's context" in info.value.message
            assert lip.call("kv_stat", path="near.kv")["tokens"] == 2  # all begin or none
            result = lip.call("generate", path="far.kv", max_tokens=4, sampler={"temperature": 0})
            assert result["finish_reason"] == "length" and result["token_ids"] == []
            assert lip.call("forward", path="near.kv", tokens=[3])["tokens"] == 3
        thread.run_sync(thread.server.store.check_invariants)
    finally:
        thread.stop()


def test_costly_outputs_are_refused_at_once(lip) -> None:
    """Outputs are bounded by what they cost: indices named over all asks, logprobs
    asked in all (merged asks at one index included)."""
    fresh(lip, "a.kv", PROMPT)
    t0 = time.perf_counter()
    for outputs in (
        [{"at": [0] * 4000, "top_k": 1}, {"at": [0] * 200, "top_k": 2}],
        [{"at": list(range(300)), "logprobs": list(range(259)), "top_k": 100}],
    ):
        with pytest.raises(SymphonyError) as info:
            lip.call("forward", path="a.kv", tokens=[5] * 300, outputs=outputs)
        assert info.value.errno == "EINVAL"
    assert time.perf_counter() - t0 < 2.0
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT)


def test_a_masked_last_token_is_recomputed_under_its_mask(lip) -> None:
    """The prediction after a file's last token (at -1, generate's first token) is what
    appending that token gave, mask and all; and the file's K/V stay as they were."""
    n = len(PROMPT)
    for path in ("a.kv", "twin.kv"):
        fresh(lip, path, PROMPT)
    masked = {"attention": [[0, 3, n, n + 1]], "positions": [3]}
    appended = lip.call("forward", path="a.kv", tokens=[7], outputs=[{"logits": True}], **masked)
    lip.call("forward", path="twin.kv", tokens=[7], **masked)
    again = lip.call(
        "forward", path="a.kv", tokens=[], keep=True, outputs=[{"at": -1, "logits": True}]
    )
    diff = max(abs(a - b) for a, b in zip(logits(appended, 0), logits(again, -1), strict=True))
    assert diff < 1e-4
    after = [
        lip.call("forward", path=p, tokens=[9], outputs=[{"logits": True}])
        for p in ("a.kv", "twin.kv")
    ]
    assert (
        max(abs(a - b) for a, b in zip(logits(after[0], 0), logits(after[1], 0), strict=True))
        < 1e-4
    )


def test_another_users_calls_are_not_fed_from_the_owners_cache(lip, tiny_server) -> None:
    """A reader scoring after a shared file must not learn, from `cached` or from time,
    which continuations the owner computed in its private files."""
    fresh(lip, "shared.kv", PROMPT[:4], mode=0o644)
    secret = [50, 51, 52, 53, 54, 55, 56, 57]
    lip.call("kv_fork", src="shared.kv", dst="private.kv", mode=0o600)
    lip.call("forward", path="private.kv", tokens=secret)
    mine = lip.call("forward", path="shared.kv", tokens=secret, keep=False, outputs=[{"top_k": 1}])
    assert mine["cached"] == 4  # the owner's own calls are served from its domain
    theirs = tiny_server.call_as(
        OTHER,
        "forward",
        path="shared.kv",
        tokens=secret,
        keep=False,
        outputs=[{"top_k": 1}],
    )
    assert not isinstance(theirs, StoreError), theirs
    assert theirs["cached"] == 0
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_generate_logprobs_match_its_tokens_when_the_context_fills(tmp_path) -> None:
    engine = Engine(
        tiny_model_files(max_position=24), EngineConfig(device="cpu", num_pages=16, page_size=4)
    )
    thread = ServerThread(engine, str(tmp_path / "c.sock")).start()
    try:
        with connect(thread.server.config.socket_path) as lip:
            fresh(lip, "c.kv", list(range(10, 30)))
            result = lip.call(
                "generate",
                path="c.kv",
                max_tokens=10,
                logprobs=2,
                sampler={"temperature": 0, "blocked": [256, 257, 258]},
            )
            assert result["finish_reason"] == "length"
            assert len(result["logprobs"]) == len(result["token_ids"])
            assert [e["token"] for e in result["logprobs"]] == result["token_ids"]
    finally:
        thread.stop()
