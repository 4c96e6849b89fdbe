"""The protocol is described once (sched/schema.py, sched/results.py): every call has
its struct, the structs compile, and docs/protocol.md is what they say."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from symphony.sched import protocol_table
from symphony.sched import schema as S
from symphony.sched.calls import HANDLERS

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_call_has_its_arguments_described():
    assert set(HANDLERS) == set(S.CALLS)


@pytest.mark.parametrize("name", sorted(S.CALLS))
def test_each_arguments_struct_checks_a_request(name):
    spec = S.CALLS[name]
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"surely_not_a_field": 1}, spec.args)


def test_the_protocol_table_is_current():
    assert DOC.read_text() == protocol_table.render(), "run: make docs"
