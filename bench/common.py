"""What the benchmarks share: syscall round trips and writing results/NAME.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any

from symphony.lipctl import connect

RESULTS = Path(__file__).parent / "results"


def round_trips(socket: str, n: int) -> dict[str, float]:
    """Median and p99 of `n` calls of `hello`, the cheapest syscall, in microseconds."""
    with connect(socket) as lip:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            lip.call("hello")
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": times[int(0.99 * n)] * 1e6}


def save_results(name: str, results: dict[str, Any], **meta: Any) -> Path:
    """Write results/NAME.json with the date and machine; returns its path."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": str(date.today()), "machine": platform.machine(), "cpus": os.cpu_count()} | meta
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return path
