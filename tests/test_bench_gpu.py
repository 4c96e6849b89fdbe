"""bench/gpu.py --dry-run: the GPU benchmark's code path on the CPU, so it cannot rot
while no GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("triton", reason="triton is not installed (pip install '.[gpu]')")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU runs bench/gpu.py itself, not its dry run"
)


def test_dry_run_checks_and_times_every_backend_beside_its_floor(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "skipped: the flash attention backend needs CUDA" in run.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tiny", "1b-shape-tiny"}
    for rows in results.values():
        assert set(rows) == {"sdpa", "triton"}
        for row in rows.values():
            assert row["agrees"] and row["top1_vs_sdpa"] == 1.0
            assert row["prefill"] > 0
            for b in (1, 2):
                assert row[f"decode_b{b}"] > 0 and row[f"floor_b{b}"] > 0
