"""forward, complete: positions, attention masks, outputs at chosen indices, keep=False,
forward_many, and the old forms' errors (raw calls on the tiny-model server)."""

from __future__ import annotations

import array

import pytest

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.lipctl import SymphonyError, connect
from tests.logit_rows import close

PROMPT = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108]  # 10 byte tokens
NEW = [100, 33, 10]


@pytest.fixture
def lip(tiny_server):
    with connect(tiny_server.server.config.socket_path) as lip:
        yield lip


def logits_of(result: dict, at: int) -> list[float]:
    (out,) = [o for o in result["outputs"] if o["at"] == at]
    return array.array("f", out["logits"]).tolist()


def fresh(lip, path: str, tokens: list[int], **args) -> dict:  # type: ignore[no-untyped-def]
    lip.call("kv_open", path=path, create=True)
    return lip.call("forward", path=path, tokens=tokens, **args)


ALL_LOGITS = [{"at": [0, 1, 2], "logits": True}]


def test_a_mask_hiding_tokens_equals_a_file_without_them(lip) -> None:
    """Tokens 3..6 hidden from everything after them (the prompt's tail included, as
    a branch that was never in the context): the same as a file that never had them."""
    fresh(lip, "a.kv", PROMPT[:7])
    n = len(PROMPT)
    tail = [[0, 3, 7, 7 + j + 1] for j in range(3)]  # 7..9 see 0..2 and themselves
    lip.call("forward", path="a.kv", tokens=PROMPT[7:], attention=tail)
    attention = [[0, 3, 7, n + j + 1] for j in range(3)]
    masked = lip.call("forward", path="a.kv", tokens=NEW, attention=attention, outputs=ALL_LOGITS)
    kept = PROMPT[:3] + PROMPT[7:]
    fresh(lip, "b.kv", kept, positions=[0, 1, 2, 7, 8, 9])
    plain = lip.call("forward", path="b.kv", tokens=NEW, outputs=ALL_LOGITS)
    for at in range(3):
        assert close(logits_of(masked, at), logits_of(plain, at))
    # and the mask mattered: the same tokens seeing everything differ
    fresh(lip, "c.kv", PROMPT)
    seen = lip.call("forward", path="c.kv", tokens=NEW, outputs=ALL_LOGITS)
    assert not close(logits_of(seen, 0), logits_of(masked, 0), 1e-3)
    assert lip.call("kv_stat", path="a.kv")["tokens"] == n + 3


def test_hiding_the_tail_equals_a_file_that_stopped_before_it(lip) -> None:
    fresh(lip, "a.kv", PROMPT)
    n = len(PROMPT)
    attention = [[0, 5, n, n + j + 1] for j in range(3)]
    masked = lip.call("forward", path="a.kv", tokens=NEW, attention=attention, outputs=ALL_LOGITS)
    fresh(lip, "b.kv", PROMPT[:5])
    plain = lip.call(
        "forward", path="b.kv", tokens=NEW, positions=[n, n + 1, n + 2], outputs=ALL_LOGITS
    )
    for at in range(3):
        assert close(logits_of(masked, at), logits_of(plain, at))


def test_a_single_token_mask_equals_the_file_without_them(lip) -> None:
    fresh(lip, "a.kv", PROMPT)
    n = len(PROMPT)
    masked = lip.call(
        "forward",
        path="a.kv",
        tokens=[NEW[0]],
        attention=[[0, 5, n, n + 1]],
        outputs=[{"logits": True}],
    )
    fresh(lip, "b.kv", PROMPT[:5], positions=[0, 1, 2, 3, 4])
    plain = lip.call(
        "forward", path="b.kv", tokens=[NEW[0]], positions=[n], outputs=[{"logits": True}]
    )
    assert close(logits_of(masked, 0), logits_of(plain, 0))


def test_explicit_default_positions_are_identical_and_shifted_ones_differ(lip) -> None:
    fresh(lip, "a.kv", PROMPT)
    plain = lip.call("forward", path="a.kv", tokens=NEW, outputs=ALL_LOGITS)
    fresh(lip, "b.kv", PROMPT)
    n = len(PROMPT)
    same = lip.call(
        "forward", path="b.kv", tokens=NEW, positions=[n, n + 1, n + 2], outputs=ALL_LOGITS
    )
    for at in range(3):
        assert logits_of(plain, at) == logits_of(same, at)
    fresh(lip, "c.kv", PROMPT)
    shifted = lip.call(
        "forward", path="c.kv", tokens=NEW, positions=[n + 5, n + 6, n + 7], outputs=ALL_LOGITS
    )
    assert not close(logits_of(plain, 0), logits_of(shifted, 0), 1e-3)
    # a token appended without positions goes after the last one stored
    shifted_next = lip.call("forward", path="c.kv", tokens=[5], outputs=[{"logits": True}])
    fresh(lip, "d.kv", PROMPT)
    lip.call("forward", path="d.kv", tokens=NEW, positions=[n + 5, n + 6, n + 7])
    explicit = lip.call(
        "forward", path="d.kv", tokens=[5], positions=[n + 8], outputs=[{"logits": True}]
    )
    assert logits_of(shifted_next, 0) == logits_of(explicit, 0)


def test_outputs_at_several_indices_equal_single_token_forwards(lip) -> None:
    fresh(lip, "many.kv", PROMPT[:4])
    tokens = PROMPT[4:]
    asked = [{"at": [0, 2, 5], "top_k": 5, "logprobs": [65, 66], "entropy": True}]
    many = lip.call("forward", path="many.kv", tokens=tokens, outputs=asked)
    assert [o["at"] for o in many["outputs"]] == [0, 2, 5]
    fresh(lip, "one.kv", PROMPT[:4])
    for i, token in enumerate(tokens):
        single = lip.call(
            "forward",
            path="one.kv",
            tokens=[token],
            outputs=[{"top_k": 5, "logprobs": [65, 66], "entropy": True}],
        )["outputs"][0]
        if i not in (0, 2, 5):
            continue
        (got,) = [o for o in many["outputs"] if o["at"] == i]
        assert [t for t, _ in got["top_k"]] == [t for t, _ in single["top_k"]]
        assert close([lp for _, lp in got["top_k"]], [lp for _, lp in single["top_k"]])
        assert close([lp for _, lp in got["logprobs"]], [lp for _, lp in single["logprobs"]])
        assert abs(got["entropy"] - single["entropy"]) < 1e-4


def test_the_prediction_after_the_files_last_token(lip) -> None:
    """at=-1 recomputes the file's last token: the same as asking when it was appended."""
    first = fresh(lip, "a.kv", PROMPT, outputs=[{"logits": True}])
    again = lip.call(
        "forward", path="a.kv", tokens=[], outputs=[{"at": -1, "logits": True}], keep=False
    )
    assert close(logits_of(first, len(PROMPT) - 1), logits_of(again, -1))
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT)


def test_keep_false_scores_without_appending(lip, tiny_server) -> None:
    fresh(lip, "a.kv", PROMPT)
    before = lip.call("kv_stat", path="a.kv")
    scored = lip.call(
        "forward", path="a.kv", tokens=NEW, keep=False, outputs=[{"at": [0, 1, 2], "logits": True}]
    )
    after = lip.call("kv_stat", path="a.kv")
    assert after["tokens"] == before["tokens"] == len(PROMPT)
    assert scored["tokens"] == len(PROMPT)
    kept = lip.call("forward", path="a.kv", tokens=NEW, outputs=[{"at": [0, 1, 2], "logits": True}])
    for at in range(3):
        assert close(logits_of(scored, at), logits_of(kept, at))
    status = lip.call("status")
    tiny_server.run_sync(tiny_server.server.store.check_invariants)
    assert status["pages"]["used"] >= 1


def test_keep_false_needs_only_read_permission(lip, tiny_server) -> None:
    lip.call("kv_open", path="shared.kv", create=True, mode=0o644)
    lip.call("forward", path="shared.kv", tokens=PROMPT)
    other = Cred(65534, 65534)
    scored = tiny_server.call_as(
        other,
        "forward",
        path="shared.kv",
        tokens=NEW,
        keep=False,
        outputs=[{"top_k": 3}],
    )
    assert not isinstance(scored, StoreError), scored
    assert len(scored["outputs"][0]["top_k"]) == 3
    refused = tiny_server.call_as(other, "forward", path="shared.kv", tokens=NEW)
    assert isinstance(refused, StoreError) and refused.errno_name == "EACCES"
    lip.call("kv_open", path="private.kv", create=True, mode=0o600)
    lip.call("forward", path="private.kv", tokens=PROMPT)
    hidden = tiny_server.call_as(other, "forward", path="private.kv", tokens=NEW, keep=False)
    assert isinstance(hidden, StoreError) and hidden.errno_name == "EACCES"
    assert lip.call("kv_stat", path="shared.kv")["tokens"] == len(PROMPT)
    tiny_server.run_sync(tiny_server.server.store.check_invariants)


def test_forward_many_answers_each_file_in_one_step(lip) -> None:
    fresh(lip, "x.kv", PROMPT[:5])
    fresh(lip, "y.kv", PROMPT[5:])
    before = lip.call("status")["steps"]
    both = lip.call(
        "forward_many",
        calls=[
            {"path": "x.kv", "tokens": NEW, "outputs": [{"logits": True}]},
            {"path": "y.kv", "tokens": NEW, "outputs": [{"logits": True}]},
        ],
    )
    assert lip.call("status")["steps"] == before + 1
    fresh(lip, "x2.kv", PROMPT[:5])
    alone = lip.call("forward", path="x2.kv", tokens=NEW, outputs=[{"logits": True}])
    assert close(logits_of(both[0], 2), logits_of(alone, 2))
    assert [r["tokens"] for r in both] == [8, 8]


def test_forward_many_refuses_as_a_whole(lip) -> None:
    fresh(lip, "x.kv", PROMPT[:5])
    with pytest.raises(SymphonyError) as err:
        lip.call(
            "forward_many",
            calls=[{"path": "x.kv", "tokens": NEW}, {"path": "missing.kv", "tokens": NEW}],
        )
    assert err.value.errno == "ENOENT" and "calls[1]" in err.value.message
    assert lip.call("kv_stat", path="x.kv")["tokens"] == 5  # nothing appended


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"mask": [1, 2]}, "allowed"),
        ({"logprobs": 3}, "top_k"),
        ({"attention": [[0, 2]]}, "itself"),
        ({"attention": [[0, 11, 3, 12]]}, "sorted"),
        ({"positions": [1, 2]}, "positions"),
        ({"positions": [10**6]}, "positions"),
        ({"outputs": [{"at": 3}]}, "outside"),
        ({"outputs": [{"sample": True}]}, "sampler"),
        ({"outputs": [{"top_k": 1000}]}, "top_k"),
        ({"outputs": [{"at": list(range(-1, 1)), "logits": True, "bogus": 1}]}, "bogus"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_and_old_forms_get_einval_naming_the_new_form(lip, args, names) -> None:
    fresh(lip, "a.kv", PROMPT)
    with pytest.raises(SymphonyError) as err:
        lip.call("forward", path="a.kv", tokens=[5], **args)
    assert err.value.errno == "EINVAL"
    assert names in err.value.message
    assert lip.call("kv_stat", path="a.kv")["tokens"] == len(PROMPT)
