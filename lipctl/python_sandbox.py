"""A small sandboxed Python evaluator, for the tools a LIP runs (examples/react_agent.py).

    python -I python_sandbox.py LIMITS_JSON CODE

Two layers. The language: CODE is parsed and refused unless it keeps to a subset of
Python: no import (but `import math`), class, with, global, nonlocal, async, yield or
match; no name that starts with '_' (but '_' itself); an attribute only where it is a
public method or field of the built-in values (str, list, dict and the like) or a name
of `math`, and never set or deleted. Then it runs with a few builtins and `math` (no
open, eval, exec, getattr, type, vars...; no Unicode errors, see ERRORS). The ways from
a value to the interpreter's insides are dunder names (`().__class__`), frames
(`gi_frame.f_globals`) and str.format's field lookups (`"{0.__class__}".format`), and
the subset names none of them. The process: the script sets rlimits (LIMITS_JSON maps
RLIMIT_ names to values, soft = hard) and, started by root, becomes nobody before the
code runs, so a hole in the first layer (a bug of the interpreter's own) still meets
bounded time, memory and output and, for root, no files of its own. It prints what the
code prints; an error is one line on stderr, "Name: message", and exit status 1.

Only the standard library here: the script runs under `python -I`, outside the package.
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import os
import resource
import sys

NOBODY = 65534
REFUSED: dict[type[ast.AST], str] = {
    ast.Import: "import",
    ast.ImportFrom: "import",
    ast.ClassDef: "class",
    ast.With: "with",
    ast.Global: "global",
    ast.Nonlocal: "nonlocal",
    ast.AsyncFunctionDef: "async",
    ast.AsyncFor: "async",
    ast.AsyncWith: "async",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Match: "match",  # a class pattern looks attributes up by name: str(format=f)
}
MATH_IMPORTS = (("math", None), ("math", "math"))  # the one import allowed
VALUES = (bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset, range, slice)
# str.format and format_map look their fields up by attribute: "{0.__class__}"
FORMATTERS = ("format", "format_map")
ATTRIBUTES = frozenset(
    name
    for namespace in (*VALUES, math)
    for name in dir(namespace)
    if not name.startswith("_") and name not in FORMATTERS
)
FUNCTIONS = (  # noqa: SIM905 (a list of 44 names, one a line, would read worse)
    "abs all any ascii bin bool bytearray bytes callable chr complex dict divmod enumerate "
    "filter float format frozenset hash hex int isinstance iter len list map max min next "
    "oct ord pow print range repr reversed round set slice sorted str sum tuple zip"
).split()
# not the Unicode errors: one made with a negative start reads the memory before its
# bytes (CPython gh-123378), the environment's strings among it
ERRORS = [
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type)
    and issubclass(value, Exception)
    and not issubclass(value, UnicodeError)
]
BUILTINS = {name: getattr(builtins, name) for name in FUNCTIONS + ERRORS}


def import_math(name: str, *args: object, **kwargs: object) -> object:
    """`import math`, the one import check() lets through, and nothing else."""
    if name != "math":
        raise ImportError(f"no module {name} here")
    return math


BUILTINS["__import__"] = import_math


class Refused(Exception):
    """Code outside the subset; the message says what."""


def check(code: str) -> ast.Module:
    """The parsed `code`, or Refused (or SyntaxError) where it leaves the subset."""
    try:
        tree = ast.parse(code, "<python>")
    except (RecursionError, MemoryError):
        raise Refused("the code is nested too deeply") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and all(
            (a.name, a.asname) in MATH_IMPORTS for a in node.names
        ):
            continue  # `math` is there already
        if type(node) in REFUSED:
            raise Refused(f"{REFUSED[type(node)]} is not allowed")
        if isinstance(node, ast.Attribute):
            if node.attr not in ATTRIBUTES:
                hint = " (an f-string formats)" if node.attr in FORMATTERS else ""
                raise Refused(f"the attribute .{node.attr} is not allowed{hint}")
            if not isinstance(node.ctx, ast.Load):  # math.pi = 3 would outlive the line
                raise Refused(f"setting or deleting .{node.attr} is not allowed")
        for field in ("id", "arg", "name", "rest"):  # names, arguments, defs, handlers
            name = getattr(node, field, None)
            if isinstance(name, str) and name.startswith("_") and name != "_":
                raise Refused(f"the name {name} is not allowed (it starts with '_')")
    return tree


def bound(limits: dict[str, int]) -> None:
    """The rlimits (never above the hard limit there is), then nobody in place of root."""
    for name, value in limits.items():
        limit = getattr(resource, "RLIMIT_" + name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def main() -> int:
    limits, code = json.loads(sys.argv[1]), sys.argv[2]
    bound(limits)
    try:
        program = compile(check(code), "<python>", "exec")
        exec(program, {"__builtins__": dict(BUILTINS), "math": math})
    except BaseException as exc:  # one line, not a traceback: the model reads it
        sys.stdout.flush()  # what it printed first, so the error is the last line
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
