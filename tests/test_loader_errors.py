"""Loader errors are one clear line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symphony.engine.errors import LoadError
from symphony.engine.model_files import load_model_files


def write_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(LoadError) as info:
        load_model_files(tmp_path / "nope.gguf")
    assert "not found" in one_line(info.value)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(LoadError) as info:
        load_model_files(bogus, use_cache=False)
    assert "not a GGUF file" in one_line(info.value)


def test_truncated_gguf_file(tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LoadError) as info:
        load_model_files(cut, use_cache=False)
    assert "cannot read GGUF file" in one_line(info.value)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(LoadError) as info:
        load_model_files(path, use_cache=False)
    assert "unsupported architecture 'bert'" in one_line(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(LoadError) as info:
        load_model_files(tmp_path)
    assert "config.json" in one_line(info.value)


def test_a_bad_model_is_one_line_from_the_demo_and_lipctl_serve(tmp_path):
    bogus = tmp_path / "x.gguf"
    bogus.write_text("hello")
    line = f"not a GGUF file (bad magic b'hell'): {bogus}"
    for argv, prefix in [
        (["symphony.lipctl.demo", "--engine-only", "--model"], "symphony-demo"),
        (
            [
                "symphony.lipctl.cli",
                "serve",
                "--no-mount",
                "--socket",
                str(tmp_path / "s"),
                "--model",
            ],
            "lipctl serve",
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", *argv, str(bogus)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [f"{prefix}: {line}"]
