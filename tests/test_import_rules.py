"""Arrows point one way: lipctl -> sched -> fs -> engine (DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> imports it must never make
FORBIDDEN = {
    "engine": ("trio", "pyfuse3", "symphony.fs", "symphony.sched", "symphony.lipctl"),
    "fs": ("symphony.sched", "symphony.lipctl"),
    "sched": ("symphony.lipctl",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_imports_against_the_arrows():
    offences = []
    for package, banned in FORBIDDEN.items():
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_modules(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offences == []


def test_fs_uses_trio_and_pyfuse3_only_in_its_fuse_adapter():
    offences = [
        f"{path.name} imports {name}"
        for path in (ROOT / "fs").glob("*.py")
        if not path.name.startswith("fuse_")
        for name in imported_modules(path)
        if name.split(".")[0] in ("trio", "pyfuse3")
    ]
    assert offences == []


def test_importing_the_engine_loads_neither_trio_nor_pyfuse3():
    engine_modules = sorted(p.stem for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import symphony.engine.{m}\n" for m in engine_modules)
        + "print(sorted(m for m in ('trio', 'pyfuse3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
