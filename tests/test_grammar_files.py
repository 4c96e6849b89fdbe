"""A grammar attached to a KV file: its state follows the file (fork, truncate, drop,
verify, cancel), an append it refuses changes nothing, another user cannot attach one."""

from __future__ import annotations

import errno
import json
import time

import jsonschema
import pytest

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.lipctl import SymphonyError, connect

PROMPT = [84, 104, 101, 32, 114, 105, 118, 101, 114]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "tags", "n"],
    "additionalProperties": False,
}
GRAMMAR = {"json_schema": SCHEMA}


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


@pytest.fixture
def check(tiny_server):
    return lambda: tiny_server.run_sync(tiny_server.server.store.check_invariants)


def constrained(lip, path: str) -> None:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True)
    lip.call("forward", path=path, tokens=PROMPT)
    stat = lip.call("kv_constrain", path=path, grammar=GRAMMAR)
    assert stat["grammar"] == GRAMMAR


def finish(lip, path: str, seed: int = 0) -> dict:  # type: ignore[no-untyped-def]
    return lip.call(
        "generate", path=path, max_tokens=300, sampler={"temperature": 1.0, "seed": seed}
    )


def valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def joined(*pieces: list[int]) -> str:
    """The text of token ids from several calls (the tiny tokenizer: a token a byte)."""
    return b"".join(bytes(p) for p in pieces).decode()


def test_generate_on_a_constrained_file_follows_its_grammar_and_stops(lip, check) -> None:
    constrained(lip, "a.kv")
    r = finish(lip, "a.kv")
    assert r["finish_reason"] == "stop"
    valid(r["text"])
    check()
    again = finish(lip, "a.kv")  # complete: nothing may follow
    assert (again["finish_reason"], again["token_ids"]) == ("stop", [])
    lip.call("kv_constrain", path="a.kv", grammar=None)  # freed: anything goes again
    assert lip.call("forward", path="a.kv", tokens=[120, 121])["tokens"] == r["tokens"] + 2
    assert lip.call("kv_stat", path="a.kv")["grammar"] is None
    check()


def test_an_append_the_grammar_refuses_is_einval_and_changes_nothing(lip, check) -> None:
    constrained(lip, "b.kv")
    lip.call("forward", path="b.kv", tokens=list(b'{"name": "x'))
    for bad in (list(b'x"}'), list(b'", 7'), [0]):
        with pytest.raises(SymphonyError) as info:
            lip.call("forward", path="b.kv", tokens=bad)
        assert info.value.errno == "EINVAL"
        assert "refused by the grammar" in info.value.message
    with pytest.raises(SymphonyError) as info:
        lip.call("forward", path="b.kv", tokens=list(b'y", "n"'))
    assert "tokens[5] (token 110" in info.value.message  # the first refused: "n" for "tags"
    assert lip.call("kv_stat", path="b.kv")["tokens"] == len(PROMPT) + 11
    # the matcher is where it was: the right continuation goes in, and the rest is valid
    lip.call("forward", path="b.kv", tokens=list(b'", "tags": ['))
    r = finish(lip, "b.kv", seed=4)
    valid(joined(list(b'{"name": "x", "tags": ['), r["token_ids"]))
    check()


def test_forward_many_with_one_refused_append_applies_none(lip) -> None:
    constrained(lip, "c1.kv")
    lip.call("kv_open", path="c2.kv", create=True)
    with pytest.raises(SymphonyError) as info:
        lip.call(
            "forward_many",
            calls=[
                {"path": "c2.kv", "tokens": PROMPT},
                {"path": "c1.kv", "tokens": list(b"[")},
            ],
        )
    assert info.value.message.startswith("calls[1]: tokens[0]")
    assert lip.call("kv_stat", path="c2.kv")["tokens"] == 0
    lip.call("forward", path="c1.kv", tokens=list(b"{"))  # the grammar did not take "["


def test_a_fork_in_the_middle_of_an_object_carries_the_grammar(lip, check) -> None:
    constrained(lip, "d.kv")
    head = lip.call("generate", path="d.kv", max_tokens=6, sampler={"temperature": 0})
    assert head["finish_reason"] == "length"
    lip.call("kv_fork", src="d.kv", dst="d2.kv")
    assert lip.call("kv_stat", path="d2.kv")["grammar"] == GRAMMAR
    one, two = finish(lip, "d.kv", seed=1), finish(lip, "d2.kv", seed=2)
    for r in (one, two):
        assert r["finish_reason"] == "stop"
        valid(joined(head["token_ids"], r["token_ids"]))
    check()


def test_truncate_rolls_the_matcher_back(lip, check) -> None:
    constrained(lip, "e.kv")
    r = finish(lip, "e.kv", seed=3)
    valid(r["text"])
    keep = len(PROMPT) + 9  # inside the object
    lip.call("kv_truncate", path="e.kv", n=keep)
    again = finish(lip, "e.kv", seed=5)
    assert again["finish_reason"] == "stop"
    valid(joined(r["token_ids"][:9], again["token_ids"]))
    # back before the grammar began: it constrains from the new end
    lip.call("kv_truncate", path="e.kv", n=4)
    fresh = finish(lip, "e.kv", seed=6)
    valid(fresh["text"])
    check()


def test_a_drop_the_grammar_refuses_is_einval_and_one_before_it_moves_it(lip, check) -> None:
    constrained(lip, "f.kv")
    lip.call("forward", path="f.kv", tokens=list(b'{"name": "ab'))
    start = len(PROMPT)
    with pytest.raises(SymphonyError) as info:  # without the brace the rest is not JSON
        lip.call("kv_drop", path="f.kv", start=start, end=start + 1)
    assert info.value.errno == "EINVAL"
    assert lip.call("kv_stat", path="f.kv")["tokens"] == start + 12
    lip.call("kv_drop", path="f.kv", start=start + 10, end=start + 11)  # the "a" of "ab"
    lip.call("kv_drop", path="f.kv", start=1, end=3)  # in the prompt: the grammar moves
    assert lip.call("kv_stat", path="f.kv")["tokens"] == start + 9
    r = finish(lip, "f.kv", seed=7)
    valid(joined(list(b'{"name": "b'), r["token_ids"]))
    check()


def test_verify_on_a_constrained_file_refuses_the_draft_where_the_grammar_does(lip, check) -> None:
    constrained(lip, "g.kv")
    forced = list(b'{"name": "')  # the only tokens the grammar allows here: always kept
    for temperature in (0.0, 1.0):
        lip.call("kv_truncate", path="g.kv", n=len(PROMPT))
        draft = [*forced, 0]  # a NUL is never allowed inside a JSON string
        sampler = {"temperature": temperature, "seed": 1}
        r = lip.call("verify", path="g.kv", draft=draft, sampler=sampler)
        assert r["accepted"] == len(forced)
        assert r["token"] != 0  # the correction follows the grammar too
        lip.call("forward", path="g.kv", tokens=[r["token"]])  # the pending token goes in
        rest = finish(lip, "g.kv", seed=2)
        valid(joined(r["token_ids"], rest["token_ids"]))
        check()


def test_verify_ahead_stops_where_the_grammar_refuses_the_draft(lip, check) -> None:
    """Past a refused draft token the rows have no mask: their guesses are not given."""
    constrained(lip, "a.kv")
    forced = list(b'{"name": "')
    r = lip.call("verify", path="a.kv", draft=[*forced, 0, 65, 66], ahead=True)
    assert (r["accepted"], r["ahead"]) == (len(forced), [])
    check()


def test_a_sample_that_keeps_nothing_follows_the_grammar_and_moves_nothing(lip, check) -> None:
    constrained(lip, "h.kv")
    for seed in range(5):
        out = lip.call(
            "forward",
            path="h.kv",
            tokens=[],
            outputs=[{"at": -1, "sample": True}],
            keep=False,
            sampler={"temperature": 1.0, "seed": seed},
        )
        assert out["token"] == ord("{")  # an object begins with one
    lip.call("forward", path="h.kv", tokens=list(b"{"))
    check()


def test_a_calls_grammar_on_a_constrained_file_is_einval(lip) -> None:
    constrained(lip, "i.kv")
    with pytest.raises(SymphonyError) as info:
        lip.call("generate", path="i.kv", max_tokens=3, grammar={"regex": "a+"})
    assert info.value.errno == "EINVAL" and "grammar of its own" in info.value.message


def test_another_user_cannot_constrain_a_file_it_cannot_write(lip, tiny_server) -> None:
    lip.call("kv_open", path="mine.kv", create=True, mode=0o644)
    got = tiny_server.call_as(Cred(4242, 4242), "kv_constrain", path="mine.kv", grammar=GRAMMAR)
    assert isinstance(got, StoreError) and got.errno == errno.EACCES
    assert lip.call("kv_stat", path="mine.kv")["grammar"] is None


def test_a_cancelled_constrained_generation_leaves_the_matcher_with_the_file(
    lip, tiny_server, check
) -> None:
    constrained(lip, "j.kv")
    gen = lip.stream_call(
        "generate", path="j.kv", max_tokens=300, stream=True, sampler={"temperature": 1.0}
    )
    next(gen)
    gen.close()  # cancels; the server ends the work within a step
    deadline = time.monotonic() + 10
    while True:
        try:
            r = finish(lip, "j.kv", seed=8)
            break
        except SymphonyError as exc:
            assert exc.errno == "EBUSY" and time.monotonic() < deadline
            time.sleep(0.01)
    done = lip.call("kv_stat", path="j.kv")["tokens"]
    assert r["finish_reason"] == "stop" and done > len(PROMPT)
    check()


def test_samples_inside_an_append_follow_the_grammar_where_they_stand(lip, check) -> None:
    constrained(lip, "k.kv")
    out = lip.call(
        "forward",
        path="k.kv",
        tokens=list(b'{"na'),
        outputs=[{"at": [-1, 0, 3], "sample": True}],
        sampler={"temperature": 1.0, "seed": 3},
    )
    drawn = {o["at"]: o["token"] for o in out["outputs"]}
    # before the object: its brace; after the brace: the key's quote; inside "na": "me"
    assert drawn == {-1: ord("{"), 0: ord('"'), 3: ord("m")}
    lip.call("forward", path="k.kv", tokens=list(b'me": "'))  # the matcher stood after "na"
    check()


def test_a_complete_grammar_takes_end_of_sequence_tokens_and_a_verify_of_one(
    lip, tiny_server, check
) -> None:
    eos = tiny_server.server.engine.tokenizer.eos_token_id
    lip.call("kv_open", path="l.kv", create=True)
    lip.call("forward", path="l.kv", tokens=PROMPT)
    lip.call("kv_constrain", path="l.kv", grammar={"regex": "[0-9]"})
    lip.call("forward", path="l.kv", tokens=[ord("1")])  # complete now
    sampled = lip.call(
        "forward",
        path="l.kv",
        tokens=[],
        outputs=[{"at": -1, "sample": True}],
        keep=False,
        sampler={"temperature": 0},
    )["token"]
    assert sampled in tiny_server.server.engine.tokenizer.stop_token_ids
    r = lip.call("verify", path="l.kv", draft=[eos], sampler={"temperature": 0})
    assert r["accepted"] in (0, 1)
    lip.call("forward", path="l.kv", tokens=[r["token"]])  # an end token goes in
    with pytest.raises(SymphonyError) as info:  # anything else does not
        lip.call("forward", path="l.kv", tokens=[ord("2")])
    assert info.value.errno == "EINVAL"
    check()
    assert lip.call("kv_stat", path="l.kv")["tokens"] >= len(PROMPT) + 2


def test_a_grammar_and_a_sampler_that_leave_no_token_fail_that_call_alone(
    lip, tiny_server, check
) -> None:
    lip.call("kv_open", path="m.kv", create=True)
    lip.call("forward", path="m.kv", tokens=PROMPT)
    for sampler in (
        {"temperature": 0, "allowed": [ord("z")]},
        {"temperature": 1.0, "allowed": [ord("z")]},
    ):
        with pytest.raises(SymphonyError) as info:
            lip.call(
                "generate", path="m.kv", max_tokens=4, sampler=sampler, grammar={"regex": "a[bc]"}
            )
        assert info.value.errno == "EINVAL" and "leaves no token" in info.value.message
        with pytest.raises(SymphonyError):  # the same with a draft
            lip.call("verify", path="m.kv", draft=[0], sampler=sampler, grammar={"regex": "a[bc]"})
    # the server goes on: the same grammar with a sampler that leaves a token
    r = lip.call(
        "generate",
        path="m.kv",
        max_tokens=4,
        sampler={"temperature": 0, "allowed": [97, 98]},
        grammar={"regex": "a[bc]"},
    )
    assert r["text"] == "ab" and r["finish_reason"] == "stop"
    check()


def test_token_ids_out_of_range_are_the_stores_einval_and_leave_the_matcher(lip, check) -> None:
    constrained(lip, "n.kv")
    for bad in ([1 << 20], [-1]):
        with pytest.raises(SymphonyError) as info:
            lip.call("forward", path="n.kv", tokens=bad)
        assert info.value.errno == "EINVAL"
    lip.call("forward", path="n.kv", tokens=list(b'{"name": "'))
    lip.call("kv_truncate", path="n.kv", n=len(PROMPT) + 2)
    lip.call("kv_fork", src="n.kv", dst="n2.kv")
    check()


def test_score_on_a_constrained_file_scores_every_choice(lip) -> None:
    lip.call("kv_open", path="o.kv", create=True)
    lip.call("forward", path="o.kv", tokens=PROMPT)
    lip.call("kv_constrain", path="o.kv", grammar={"regex": "(yes|no)"})
    kv = connect_kv(lip, "o.kv")
    scores = kv.score([list(b"yes"), list(b"no")])
    assert len(scores) == 2 and all(s < 0 for s in scores)


def connect_kv(lip, path: str):  # type: ignore[no-untyped-def]
    from symphony.lipctl.client import KV

    return KV(lip, path)


def test_the_grammar_of_a_file_is_its_readers_to_see(lip, tiny_server) -> None:
    lip.call("kv_open", path="p.kv", create=True, mode=0o600)
    lip.call("kv_constrain", path="p.kv", grammar={"regex": "secret[0-9]+"})
    got = tiny_server.call_as(Cred(4242, 4242), "kv_stat", path="p.kv")
    assert not isinstance(got, StoreError) and got["grammar"] is None
    assert lip.call("kv_stat", path="p.kv")["grammar"] == {"regex": "secret[0-9]+"}


def test_grammar_values_json_cannot_hold_are_einval(lip) -> None:
    lip.call("kv_open", path="q.kv", create=True)
    for grammar in ({"json_schema": {"a": b"\x00"}}, {"regex": b"abc"}, {"lark": 5}):
        with pytest.raises(SymphonyError) as info:
            lip.call("kv_constrain", path="q.kv", grammar=grammar)
        assert info.value.errno == "EINVAL"
