"""Generation under a grammar: JSON Schema, json_object, regex and Lark, every sample
valid; forced tokens cost no sampling; bad grammars are EINVAL with the parser's words."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from symphony.lipctl import SymphonyError, connect

PROMPT = [84, 104, 101, 32, 114, 105, 118, 101, 114]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["name", "id"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L", 1, None]},
        },
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "bounds": {
        "type": "object",
        "properties": {
            "t": {"type": "number", "minimum": -10.5, "maximum": 40},
            "p": {"type": "integer", "exclusiveMinimum": 0, "maximum": 100},
        },
        "required": ["t", "p"],
        "additionalProperties": False,
    },
    "required": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "string", "maxLength": 4},
            "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["a", "c"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def socket(tiny_server):
    return tiny_server.server.config.socket_path


def sample_many(socket: str, grammar: dict, seeds: range, max_tokens: int = 200) -> list[dict]:
    """One generate per seed at temperature 1, eight at a time, each on a fresh file."""

    def one(seed: int) -> dict:
        with connect(socket) as lip:
            path = f"s{seed}-{abs(hash(json.dumps(grammar))) % 10**6}.kv"
            lip.call("kv_open", path=path, create=True)
            lip.call("forward", path=path, tokens=PROMPT)
            result = lip.call(
                "generate",
                path=path,
                max_tokens=max_tokens,
                sampler={"temperature": 1.0, "seed": seed},
                grammar=grammar,
            )
            lip.call("kv_unlink", path=path)
            return result

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, seeds))


def test_two_hundred_seeded_samples_of_five_schemas_validate(socket, tiny_server) -> None:
    for name, schema in SCHEMAS.items():
        results = sample_many(socket, {"json_schema": schema}, range(40))
        for r in results:
            assert r["finish_reason"] == "stop", (name, r)
            jsonschema.validate(json.loads(r["text"]), schema)
        # the samples differ: the grammar constrains, it does not decide
        assert len({r["text"] for r in results}) > 5, name
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_regex_and_lark_samples_match(socket) -> None:
    regex = r"[0-9]{3}-[a-z]{2,5}"
    for r in sample_many(socket, {"regex": regex}, range(20)):
        assert r["finish_reason"] == "stop"
        assert re.fullmatch(regex, r["text"]), r["text"]
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'
    for r in sample_many(socket, {"lark": lark}, range(20)):
        assert r["finish_reason"] == "stop"
        assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r["text"]), r["text"]


def test_json_object_gives_an_object(socket) -> None:
    for r in sample_many(socket, {"json_object": True}, range(10), max_tokens=400):
        if r["finish_reason"] == "stop":
            assert isinstance(json.loads(r["text"]), dict)
        else:  # a random model may nest deep; what it made is a prefix of an object
            assert r["text"].startswith("{")


def test_same_seed_same_text_under_a_grammar(socket) -> None:
    grammar = {"json_schema": SCHEMAS["nested"]}
    a, b = (sample_many(socket, grammar, range(3, 4))[0] for _ in range(2))
    assert a["text"] == b["text"]


def test_forced_tokens_are_appended_without_a_step_each(socket, tiny_server) -> None:
    schema = {
        "type": "object",
        "properties": {"a_rather_long_key_name": {"enum": ["yes", "no"]}},
        "required": ["a_rather_long_key_name"],
        "additionalProperties": False,
    }
    scheduler = tiny_server.server.scheduler
    before = scheduler.num_steps
    (r,) = sample_many(socket, {"json_schema": schema}, range(1))
    steps = scheduler.num_steps - before
    assert json.loads(r["text"])["a_rather_long_key_name"] in ("yes", "no")
    n = r["usage"]["completion_tokens"]
    assert n == len(r["token_ids"]) >= 30
    # the key and the brackets are forced: a handful of samples, not one step a token
    assert steps < n / 3, (steps, n)


def test_logprobs_under_a_grammar_give_one_entry_a_token(socket) -> None:
    with connect(socket) as lip:
        lip.call("kv_open", path="lp.kv", create=True)
        lip.call("forward", path="lp.kv", tokens=PROMPT)
        r = lip.call(
            "generate",
            path="lp.kv",
            max_tokens=60,
            logprobs=2,
            sampler={"temperature": 0},
            grammar={"json_schema": SCHEMAS["enums"]},
        )
    jsonschema.validate(json.loads(r["text"]), SCHEMAS["enums"])
    assert len(r["logprobs"]) == len(r["token_ids"])
    assert all(entry["logprob"] <= 0.0 for entry in r["logprobs"])


@pytest.mark.parametrize(
    ("grammar", "words"),
    [
        ({"regex": "[a-"}, "unclosed character class"),
        ({"lark": "start: foo"}, "unknown name"),
        ({"json_schema": {"type": 5}}, "type"),
        ({"yaml": "x"}, "unknown kind"),
        ({"regex": "a", "lark": "start: x"}, "exactly one"),
        ({"json_object": False}, "json_object takes true"),
    ],
)
def test_a_bad_grammar_is_einval_with_the_parsers_message(socket, grammar, words) -> None:
    with connect(socket) as lip:
        lip.call("kv_open", path="bad.kv", create=True)
        lip.call("forward", path="bad.kv", tokens=PROMPT)
        for call, args in (
            ("generate", {"max_tokens": 4}),
            ("forward", {"tokens": [32], "sampler": {}}),
            ("verify", {"draft": [32]}),
            ("kv_constrain", {}),
        ):
            with pytest.raises(SymphonyError) as info:
                lip.call(call, path="bad.kv", grammar=grammar, **args)
            assert info.value.errno == "EINVAL"
            assert words in info.value.message
        assert lip.call("kv_stat", path="bad.kv")["tokens"] == len(PROMPT)  # nothing changed
