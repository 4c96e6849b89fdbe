"""Reading /.sys/ctl command lines (the mount tests run them for real)."""

from __future__ import annotations

import pytest

from symphony.fs.errors import StoreError
from symphony.sched.control import parse_command


@pytest.mark.parametrize(
    ("line", "call", "args"),
    [
        ("status", "status", {}),
        (
            "  kv_open a.kv create=true mode=384 ",
            "kv_open",
            {"path": "a.kv", "create": True, "mode": 384},
        ),
        ("kv_fork a.kv b.kv", "kv_fork", {"src": "a.kv", "dst": "b.kv"}),
        ("kv_truncate a.kv 3", "kv_truncate", {"path": "a.kv", "n": 3}),
        ("kv_stat 42", "kv_stat", {"path": "42"}),  # a bare path stays text
        ("forward a.kv [5, 6,7]", "forward", {"path": "a.kv", "tokens": [5, 6, 7]}),
        ('forward a.kv text="two words"', "forward", {"path": "a.kv", "text": "two words"}),
        ('tokenize "x=1 y"', "tokenize", {"text": "x=1 y"}),
        (
            'generate a.kv max_tokens=4 sampler={"temperature": 0, "top_k": 5} stop=["\\n"]',
            "generate",
            {
                "path": "a.kv",
                "max_tokens": 4,
                "sampler": {"temperature": 0, "top_k": 5},
                "stop": ["\n"],
            },
        ),
        ("kill 17", "kill", {"pid": 17}),
    ],
)
def test_lines_become_calls(line, call, args):
    assert parse_command(line) == (call, args)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "kv_fork a b c",
        "status extra",
        "forward a.kv [1, 2",
        "path=a.kv kv_stat",
        'x "open',
    ],
)
def test_malformed_lines_are_einval(line):
    with pytest.raises(StoreError) as info:
        parse_command(line)
    assert info.value.errno_name == "EINVAL"
