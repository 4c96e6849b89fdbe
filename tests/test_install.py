"""The project installs under the one namespace `symphony`, as a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "fs", "sched", "lipctl")
CHECK = """
import importlib.util, json, sys, sysconfig
import symphony.engine.engine, symphony.fs, symphony.sched, symphony.lipctl
stdlib = sysconfig.get_paths()["stdlib"]
specs = {n: importlib.util.find_spec(n) for n in ("engine", "fs", "sched", "lipctl")}
print(json.dumps({
    "engine_file": symphony.engine.engine.__file__,
    # the standard library's own `sched` is fine; anything else of these names is ours
    "top_level": [n for n, s in specs.items()
                  if s is not None and not (s.origin or "").startswith(stdlib)],
}))
"""


def run_check(python: Path | str, cwd: Path) -> dict:
    import json

    out = subprocess.run(
        [str(python), "-c", CHECK], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_editable_install_imports_under_symphony(tmp_path):
    result = run_check(sys.executable, tmp_path)  # outside the checkout: no cwd imports
    assert result["engine_file"] == str(ROOT / "engine" / "engine.py")
    assert result["top_level"] == []


@pytest.mark.slow
def test_wheel_installs_only_the_symphony_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("symphony-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"symphony", next(t for t in tops if t.endswith(".dist-info"))}
    for package in PACKAGES:
        assert f"symphony/{package}/__init__.py" in names
    assert not any(n.startswith("symphony/__init__") for n in names)  # a namespace package

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # borrow the dependencies (torch, ...) from this environment without its .pth files,
    # so this environment's editable finder stays out of the fresh one
    site = Path(sysconfig.get_paths()["purelib"])
    fresh_site = next((env_dir / "lib").glob("python3*/site-packages"))
    (fresh_site / "deps.pth").write_text(f"{site}\n")
    result = run_check(python, tmp_path)
    assert result["engine_file"].startswith(str(fresh_site / "symphony"))
    assert result["top_level"] == []
