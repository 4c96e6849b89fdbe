"""docs/protocol.md from schema.CALLS: every call, its arguments and its result.

    python -m symphony.sched.protocol_table > docs/protocol.md

A test checks the committed file is what this prints, so the table is never stale.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import inspect as mi

from symphony.sched import results as R
from symphony.sched import schema as S

HEAD = """# The syscall protocol

Generated from `sched/schema.py` and `sched/results.py` by
`python -m symphony.sched.protocol_table`; do not edit by hand.

Frames are length-prefixed msgpack maps (`sched/protocol.py`): a request
`{"id", "call", "args"}`, stream frames `{"id", "stream"}`, then one final
`{"id", "ok": true, "result"}` or `{"id", "ok": false, "errno", "message"}`. A frame
`{"cancel": id}` cancels a request of the same connection. Arguments are checked against
the structs below: a wrong type, a missing or unknown field, or a value out of bounds is
EINVAL naming the field.
"""


def type_name(t: mi.Type) -> str:
    """A short name of a msgspec type."""
    if isinstance(t, mi.Metadata):
        return type_name(t.type)
    simple = {
        mi.IntType: "int",
        mi.FloatType: "float",
        mi.StrType: "str",
        mi.BoolType: "bool",
        mi.BytesType: "bytes",
        mi.AnyType: "any",
        mi.NoneType: "null",
    }
    for kind, name in simple.items():
        if isinstance(t, kind):
            return name
    if isinstance(t, mi.ListType):
        return f"[{type_name(t.item_type)}]"
    if isinstance(t, mi.TupleType):
        return "(" + ", ".join(type_name(i) for i in t.item_types) + ")"
    if isinstance(t, mi.DictType):
        return f"{{{type_name(t.key_type)}: {type_name(t.value_type)}}}"
    if isinstance(t, mi.UnionType):
        return " or ".join(type_name(i) for i in t.types)
    if isinstance(t, mi.StructType):
        return t.cls.__name__
    if isinstance(t, mi.LiteralType):
        return " or ".join(repr(v) for v in t.values)
    return type(t).__name__


def _bounds(t: mi.Type) -> str:
    found = []
    while isinstance(t, mi.Metadata):
        t = t.type
    for name in ("ge", "le", "min_length", "max_length"):
        value = getattr(t, name, None)
        if value is not None:
            found.append(f"{name} {value}")
    return ", ".join(found)


def _description(t: mi.Type) -> str:
    return (t.extra_json_schema or {}).get("description", "") if isinstance(t, mi.Metadata) else ""


def fields_table(cls: type) -> list[str]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    if not info.fields:
        return ["(no fields)", ""]
    rows = ["| field | type | default | notes |", "|---|---|---|---|"]
    for f in info.fields:
        if f.required:
            default = "required"
        elif f.default is not msgspec.NODEFAULT:
            default = f"`{msgspec.json.encode(f.default).decode()}`"
        else:
            default = "`[]`"
        notes = "; ".join(n for n in (_description(f.type), _bounds(f.type)) if n)
        rows.append(f"| `{f.name}` | {type_name(f.type)} | {default} | {notes} |")
    return [*rows, ""]


def result_name(result: Any) -> str:
    if result is None:
        return "null"
    return type_name(mi.type_info(result))


def render() -> str:
    lines = [HEAD, "## Calls", "", "| call | what | result | streams |", "|---|---|---|---|"]
    for name, spec in S.CALLS.items():
        stream = result_name(spec.stream) if spec.stream is not None else ""
        lines.append(f"| `{name}` | {spec.doc} | {result_name(spec.result)} | {stream} |")
    lines.append("")
    lines += ["## Arguments", ""]
    seen: set[type] = set()
    for name, spec in S.CALLS.items():
        lines += [f"### {name}", "", *fields_table(spec.args)]
        seen.add(spec.args)
    lines += ["## Structs inside arguments", ""]
    for cls in (S.Sampler, S.OutputAsk, S.Message):
        lines += [f"### {cls.__name__}", "", (cls.__doc__ or "").strip(), "", *fields_table(cls)]
    lines += ["## Results", ""]
    for cls in (
        R.Stat,
        R.ForwardResult,
        R.Output,
        R.VerifyResult,
        R.GenerateResult,
        R.Usage,
        R.TokenLogprob,
        R.Piece,
    ):
        doc = " ".join((cls.__doc__ or "").split())
        lines += [f"### {cls.__name__}", "", doc, "", *fields_table(cls)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
