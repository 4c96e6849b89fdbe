"""The program library's tests: an example LIP imported as a module (each has an async
`run(lip, ...)` beside its command line), and a tiny-model server to run it on."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.server_helpers import ROOT


def load_example(name: str) -> ModuleType:
    """examples/NAME.py as a module (its command line runs only as __main__)."""
    path = ROOT / "examples" / f"{name}.py"
    module_name = f"example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
