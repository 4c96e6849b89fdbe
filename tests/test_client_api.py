"""The client library's surface: the blocking and trio flavours alike, results decoded
into lipctl.results structs, old call forms refused with the new one named, and score's
single forward built as the wire spec says. No server: calls go to a fake."""

from __future__ import annotations

import inspect
import struct
from typing import Any

import pytest

from symphony.lipctl import aio, client
from symphony.lipctl.client import (
    KV,
    ForwardResult,
    GenerateResult,
    Lip,
    Piece,
    SymphonyError,
    decode,
    logit_values,
    score_args,
)
from symphony.lipctl.results import Output

# the one public difference: a coroutine closes the trio connection, as trio names it
RENAMED = {"close": "aclose"}


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


@pytest.mark.parametrize("blocking, trio_flavour", [(Lip, aio.AsyncLip), (KV, aio.AsyncKV)])
def test_both_flavours_have_the_same_documented_methods(blocking, trio_flavour):
    sync, trio_methods = public_methods(blocking), public_methods(trio_flavour)
    assert {RENAMED.get(n, n) for n in sync} == set(trio_methods)
    for name, method in [*sync.items(), *trio_methods.items()]:
        assert inspect.getdoc(method), f"{name} has no docstring"
    for name, method in sync.items():
        other = trio_methods[RENAMED.get(name, name)]
        assert list(inspect.signature(method).parameters) == list(
            inspect.signature(other).parameters
        ), name


def test_the_expected_calls_are_there():
    lip = {"tokenize", "detokenize", "apply_chat_template", "kv", "mkdir", "listdir"}
    lip |= {"status", "ps", "spawn", "kill", "wait", "forward_many", "call", "stream_call"}
    kv = {"stat", "append", "request", "forward", "verify", "score", "sample", "generate"}
    kv |= {"generate_stream", "fork", "truncate", "unlink", "kv_verify"}
    assert lip <= set(public_methods(Lip)) and kv <= set(public_methods(KV))


def test_forward_results_decode_with_their_outputs_and_logits():
    logits = struct.pack("<3f", 1.0, -2.5, 3.0)
    raw = {
        "tokens": 9,
        "cached": 4,
        "outputs": [
            {"at": 0, "token": 5, "logprob": -0.1, "top_k": [[5, -0.1], [7, -2.0]]},
            {"at": 2, "logprobs": [[3, -1.5]], "entropy": 0.7, "logits": logits},
        ],
        "token": 5,
        "added_later": "ignored",
    }
    result = decode(raw, ForwardResult)
    assert (result.tokens, result.cached, result.token) == (9, 4, 5)
    first, second = result.outputs
    assert first.top_k == [(5, -0.1), (7, -2.0)] and first.logits is None
    assert second.logprobs == [(3, -1.5)] and second.token is None
    assert list(second.logit_values()) == [1.0, -2.5, 3.0] == list(logit_values(logits))
    with pytest.raises(ValueError, match="no logits"):
        first.logit_values()
    with pytest.raises(ValueError):
        logit_values(b"abc")


def test_a_result_of_the_wrong_shape_is_eproto():
    with pytest.raises(SymphonyError) as info:
        decode({"tokens": "many", "cached": 0, "outputs": []}, ForwardResult)
    assert info.value.errno == "EPROTO"
    with pytest.raises(SymphonyError):
        decode({"text": "", "token_ids": [], "finish_reason": "bored", "tokens": 0}, GenerateResult)


def test_generate_results_and_pieces_print_as_their_text():
    raw = {
        "text": "Hello",
        "token_ids": [1, 2],
        "finish_reason": "stop",
        "tokens": 7,
        "usage": {"prompt_tokens": 5, "cached_tokens": 4, "completion_tokens": 2},
        "logprobs": [{"token": 1, "logprob": -0.5, "top": [[1, -0.5], [9, -1.0]]}],
    }
    result = decode(raw, GenerateResult)
    assert str(result) == "Hello" and f"{result}!" == "Hello!"
    assert result.usage.cached_tokens == 4 and result.logprobs is not None
    assert result.logprobs[0].top == [(1, -0.5), (9, -1.0)]
    assert str(decode({"text": "lo", "token_ids": [2]}, Piece)) == "lo"


class FakeLip:
    """Answers calls from a table and records them."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, name: str, /, **args: Any) -> Any:
        self.calls.append((name, args))
        return self.answers[name]


def fake_kv(**answers: Any) -> tuple[KV, FakeLip]:
    lip = FakeLip(answers)
    return KV(lip, "f.kv"), lip  # type: ignore[arg-type]


def test_old_forward_forms_name_the_new_ones():
    kv, lip = fake_kv()
    with pytest.raises(TypeError, match="top_k"):
        kv.forward([1], logprobs=3)
    with pytest.raises(TypeError, match="allowed="):
        kv.forward([1], temperature=0, mask=[1, 2])
    with pytest.raises(TypeError, match="tempreature"):
        kv.forward([1], tempreature=0)
    with pytest.raises(TypeError, match="top_k"):
        aio.AsyncKV(None, "f.kv").request([1], logprobs=3)  # type: ignore[arg-type]
    assert lip.calls == []  # refused before anything was sent


def test_forward_sends_the_wire_form():
    answer = {"tokens": 3, "cached": 0, "outputs": [{"at": 1, "token": 8}], "token": 8}
    kv, lip = fake_kv(forward=answer)
    result = kv.forward(
        [4, 5],
        positions=[10, 11],
        attention=[None, (0, 2)],
        outputs=[{"at": 1, "sample": True}],
        keep=False,
        temperature=0.5,
        allowed=(1, 8),
    )
    assert result.token == 8 and result.outputs == [Output(at=1, token=8)]
    assert lip.calls == [
        (
            "forward",
            {
                "path": "f.kv",
                "tokens": [4, 5],
                "positions": [10, 11],
                "attention": [None, [0, 2]],
                "outputs": [{"at": 1, "sample": True}],
                "keep": False,
                "sampler": {"temperature": 0.5, "allowed": [1, 8]},
            },
        )
    ]
    assert kv.request([1]) == {"path": "f.kv", "tokens": [1]}  # defaults stay off the wire


def test_sample_is_a_keep_false_forward_at_minus_one():
    kv, lip = fake_kv(forward={"tokens": 3, "cached": 0, "outputs": [], "token": 42})
    assert kv.sample(temperature=0.7, seed=1) == 42
    ((name, args),) = lip.calls
    assert name == "forward" and args["tokens"] == [] and args["keep"] is False
    assert args["outputs"] == [{"at": -1, "sample": True}]
    assert args["sampler"] == {"temperature": 0.7, "seed": 1}


def test_score_is_one_forward_with_each_choice_after_the_file():
    args = score_args("f.kv", 3, [[5, 6], [7], [5, 9, 2]])
    assert args["tokens"] == [5, 6, 7, 5, 9, 2]
    assert args["positions"] == [3, 4, 3, 3, 4, 5]
    # the first choice is causal; the others see the file and their own earlier tokens
    assert args["attention"] == [None, None, [0, 3, 5, 6], [0, 3, 6, 7], [0, 3, 6, 8], [0, 3, 6, 9]]
    assert args["outputs"] == [
        {"at": -1, "logprobs": [5, 7]},
        {"at": 0, "logprobs": [6]},
        {"at": 3, "logprobs": [9]},
        {"at": 4, "logprobs": [2]},
    ]
    assert args["keep"] is False and "sampler" not in args


def test_score_returns_the_mean_logprob_of_each_choice():
    answer = {
        "tokens": 3,
        "cached": 0,
        "outputs": [
            {"at": -1, "logprobs": [[5, -1.0], [7, -3.0]]},
            {"at": 0, "logprobs": [[6, -2.0]]},
        ],
    }
    kv, lip = fake_kv(kv_stat={"tokens": 3}, forward=answer)
    assert kv.score([[5, 6], [7]]) == [-1.5, -3.0]
    assert [name for name, _ in lip.calls] == ["kv_stat", "forward"]
    kv, _ = fake_kv(kv_stat={"tokens": 3}, forward={**answer, "tokens": 4})
    with pytest.raises(SymphonyError) as info:  # the file grew meanwhile
        kv.score([[5, 6], [7]])
    assert info.value.errno == "EAGAIN"
    with pytest.raises(SymphonyError) as info:
        score_args("f.kv", 0, [[1]])
    assert info.value.errno == "EINVAL"
    with pytest.raises(SymphonyError):
        score_args("f.kv", 3, [[1], []])


def test_verify_and_generate_send_their_arguments():
    kv, lip = fake_kv(
        verify={"tokens": 6, "accepted": 1, "token": 9, "token_ids": [4, 9]},
        generate={
            "text": "hi",
            "token_ids": [3],
            "finish_reason": "length",
            "tokens": 4,
            "usage": {"prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 1},
        },
    )
    verdict = kv.verify([4, 5], tokens=[2], draft_probs=[{4: 0.9}, {5: 1.0}], temperature=1.0)
    assert (verdict.accepted, verdict.token, verdict.token_ids) == (1, 9, [4, 9])
    assert lip.calls[0][1] == {
        "path": "f.kv",
        "draft": [4, 5],
        "tokens": [2],
        "draft_probs": [{4: 0.9}, {5: 1.0}],
        "sampler": {"temperature": 1.0},
    }
    assert kv.generate(max_tokens=1, logprobs=2, temperature=0).finish_reason == "length"
    assert lip.calls[1][1]["logprobs"] == 2 and lip.calls[1][1]["sampler"] == {"temperature": 0}


def test_the_client_re_exports_its_result_types():
    assert client.ForwardResult is ForwardResult and "GenerateResult" in client.__all__
