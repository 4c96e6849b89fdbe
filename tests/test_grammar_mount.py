"""A file's grammar on the mount (user.kv.grammar; cp copies it, setfattr rolls it back)
and across a restart with --state."""

from __future__ import annotations

import json
import os
import struct

import jsonschema
import pytest

from symphony.lipctl import connect
from tests.mount_helpers import NOBODY, StatefulServer, needs_fuse, sh, status

pytestmark = needs_fuse

PROMPT = [84, 104, 101, 32, 114, 105, 118, 101, 114]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}
GRAMMAR = {"json_schema": SCHEMA}


def begun(lip, path: str, max_tokens: int = 6) -> list[int]:  # type: ignore[no-untyped-def]
    """A constrained file with the first `max_tokens` tokens of an object generated."""
    kv = lip.kv(path, create=True)
    kv.append(PROMPT)
    kv.constrain(GRAMMAR)
    head = kv.generate(max_tokens=max_tokens, temperature=0)
    assert head.finish_reason == "length"
    return list(head.token_ids)


def finished(lip, path: str, head: list[int], seed: int) -> None:  # type: ignore[no-untyped-def]
    rest = lip.kv(path).generate(max_tokens=200, temperature=1.0, seed=seed)
    assert rest.finish_reason == "stop"
    jsonschema.validate(json.loads(bytes(head + list(rest.token_ids)).decode()), SCHEMA)


def test_the_grammar_xattr_cp_and_a_rollback_by_setfattr(mounted):
    mount, socket = mounted
    path = lambda name: os.path.join(mount, name)  # noqa: E731
    with connect(socket) as lip:
        head = begun(lip, "a.kv")
        assert json.loads(os.getxattr(path("a.kv"), "user.kv.grammar")) == GRAMMAR
        assert "user.kv.grammar" in os.listxattr(path("a.kv"))
        # cp copies the bytes, whose header carries the grammar and where it began
        out = sh("cp", path("a.kv"), path("b.kv"))
        assert out.returncode == 0, out.stderr
        assert json.loads(os.getxattr(path("b.kv"), "user.kv.grammar")) == GRAMMAR
        assert os.stat(path("a.kv")).st_size == os.stat(path("b.kv")).st_size
        finished(lip, "b.kv", head, seed=1)
        # roll a.kv back into the object by the shell, and go on from there
        keep = len(PROMPT) + 3
        out = sh("setfattr", "-n", "user.kv.tokens", "-v", str(keep), path("a.kv"))
        assert out.returncode == 0, out.stderr
        finished(lip, "a.kv", head[:3], seed=2)
        # attach one by the shell, refuse a bad one, take it off
        lip.kv("c.kv", create=True).append(PROMPT)
        regex = json.dumps({"regex": "[0-9]{2}"})
        assert sh("setfattr", "-n", "user.kv.grammar", "-v", regex, path("c.kv")).returncode == 0
        digits = lip.kv("c.kv").generate(max_tokens=10, temperature=1.0, seed=3)
        assert digits.finish_reason == "stop" and digits.text.isdigit() and len(digits.text) == 2
        bad = sh("setfattr", "-n", "user.kv.grammar", "-v", '{"regex": "[a-"}', path("c.kv"))
        assert bad.returncode != 0
        assert json.loads(os.getxattr(path("c.kv"), "user.kv.grammar")) == json.loads(regex)
        os.chmod(path("c.kv"), 0o666)
        other = sh("setfattr", "-x", "user.kv.grammar", path("c.kv"), user=NOBODY)
        assert other.returncode == 0  # it may write the file, so it may free it
        assert sh("getfattr", "-n", "user.kv.grammar", path("c.kv")).returncode != 0
        assert lip.kv("c.kv").stat()["grammar"] is None
    assert status(mount)["invariants"] == "ok"


def test_an_import_whose_tokens_its_grammar_refuses_is_einval(mounted, tmp_path):
    mount, socket = mounted
    with connect(socket) as lip:
        begun(lip, "x.kv")
    with open(os.path.join(mount, "x.kv"), "rb") as f:
        raw = f.read()
    (length,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12 : 12 + length])
    assert header["grammar"]["start"] == len(PROMPT)
    assert json.loads(header["grammar"]["source"]) == SCHEMA
    header["grammar"] = {"kind": "regex", "source": "[0-9]+", "start": len(PROMPT)}
    body = json.dumps(header).encode()
    target = tmp_path / "forged.kv"
    target.write_bytes(raw[:8] + struct.pack("<I", len(body)) + body + raw[12 + length :])
    out = sh("cp", str(target), os.path.join(mount, "forged.kv"))
    assert out.returncode != 0 and "Invalid argument" in out.stderr
    with connect(socket) as lip:
        assert lip.kv("forged.kv").stat()["tokens"] == 0
    assert status(mount)["invariants"] == "ok"


@pytest.fixture
def stateful(tmp_path):
    server = StatefulServer(str(tmp_path / "state"))
    yield server
    server.close()


def test_a_constrained_file_is_restored_with_its_matcher(stateful):
    with connect(stateful.socket) as lip:
        head = begun(lip, "s.kv", max_tokens=5)
    stateful.stop()
    stateful.start()
    with connect(stateful.socket) as lip:
        assert lip.kv("s.kv").stat()["grammar"] == GRAMMAR
        finished(lip, "s.kv", head, seed=4)


def test_cp_over_a_constrained_file_brings_the_sources_grammar_or_none(mounted):
    mount, socket = mounted
    path = lambda name: os.path.join(mount, name)  # noqa: E731
    # a grammar larger than a page of header: the copy still carries it
    big = {"json_schema": {**SCHEMA, "description": "x" * 20000}}
    with connect(socket) as lip:
        lip.kv("plain.kv", create=True).append(PROMPT)
        target = lip.kv("target.kv", create=True)
        target.append(PROMPT)
        target.constrain(GRAMMAR)
        big_file = lip.kv("big.kv", create=True)
        big_file.append(PROMPT)
        big_file.constrain(big)
        big_file.append(list(b'{"name": "'))
    assert sh("cp", path("plain.kv"), path("target.kv")).returncode == 0  # O_TRUNC, import
    assert sh("cp", path("big.kv"), path("big2.kv")).returncode == 0
    with connect(socket) as lip:
        st = lip.kv("target.kv").stat()
        assert (st["tokens"], st["grammar"]) == (len(PROMPT), None)
        lip.kv("target.kv").append(list(b"anything"))
        assert lip.kv("big2.kv").stat()["grammar"] == big
        head = list(b'{"name": "')
        finished(lip, "big2.kv", head, seed=5)
    assert status(mount)["invariants"] == "ok"
