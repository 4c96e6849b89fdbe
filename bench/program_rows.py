"""One row of bench/programs.py: a program of the library (examples/NAME.py, its LIP form)
and the same job done by prompt serving (bench/prompt_serving.py), each a coroutine on a
connection that returns what it made.

Each bench/programs_*.py module lists its rows in ROWS; bench/programs.py runs the LIP
forms on a server with its prefix cache and the prompt forms on one without, side by
side in one run, and compares the times, the outputs and the quality figures.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symphony.lipctl.aio import AsyncLip

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# example("NAME"): examples/NAME.py, imported (its command line runs only as __main__)
from tests.program_helpers import load_example as example  # noqa: E402  (the root, above)

__all__ = ["Form", "Row", "example"]

Form = Callable[[AsyncLip], Awaitable[dict[str, Any]]]


@dataclass
class Row:
    """A program and its prompt-serving form.

    Both forms return a dict with at least "output" (what the job made: a text, token
    ids, an answer), and "quality" (a number, higher is better) where `quality` names
    one. Where `same_output` is set, the program is deterministic (greedy or seeded) and
    both forms must make the same output, and the same `same_keys` (its trace: every
    chain, sample or step).
    """

    program: str  # examples/NAME.py
    uses: str  # the calls the program is built on
    lip: Form
    prompts: Form
    quality: str = ""  # what the "quality" figure is, e.g. "votes for the right answer"
    same_output: bool = False
    same_keys: tuple[str, ...] = ("output",)  # what must agree where same_output is set
