"""Root's `hello` latency while another client floods the server, against idle.

    python bench/floods.py [--quick]

Starts `lipctl serve` on the embedded model, mounted (for the /.sys/ctl flood) when
/dev/fuse is there. Each flood runs in its own process, as uid 65534, for a few seconds,
while this process times `hello` round trips on its own connection. Prints a table and
writes bench/results/floods.json and floods.png. Target: p99 under 50 ms for each flood.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket as socketlib
import tempfile
import time

from common import save_results  # bench/common.py

from symphony.lipctl import SymphonyError, connect
from symphony.lipctl.launch import start_server, stop_server
from symphony.sched.protocol import encode

FLOOD_UID = 65534


def _calls(socket: str, call: str, args: dict, until: float) -> None:
    with connect(socket) as lip:
        while time.monotonic() < until:
            with contextlib.suppress(SymphonyError):  # refusals are part of the flood
                lip.call(call, **args)


def _pipeline(socket: str, until: float) -> None:
    """10,000 requests at a time, replies never read."""
    sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    sock.connect(socket)
    sock.setblocking(False)
    frames = b"".join(encode({"id": i, "call": "status", "args": {}}) for i in range(10_000))
    while time.monotonic() < until:
        try:
            sock.send(frames)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading: backpressure
    sock.close()


def _ctl(mount: str, until: float) -> None:
    lines = b"status\n" * 60_000
    while time.monotonic() < until:
        with open(os.path.join(mount, ".sys", "ctl"), "r+b", buffering=0) as ctl:
            with contextlib.suppress(OSError):  # EAGAIN: too many wait already
                ctl.write(lines)
            while ctl.read(1 << 20):
                if time.monotonic() >= until:
                    break


FLOODS = {
    "mkdir -p 4,000 levels": lambda s, m, u: _calls(
        s, "mkdir", {"path": "/".join(["d"] * 4000), "parents": True}, u
    ),
    "tokenize 1 Mi chars": lambda s, m, u: _calls(s, "tokenize", {"text": "word " * 209715}, u),
    "tokenize 4 Mi chars": lambda s, m, u: _calls(s, "tokenize", {"text": "word " * 838860}, u),
    "16 MiB frame": lambda s, m, u: _calls(s, "tokenize", {"text": "w" * (16 * 2**20 - 64)}, u),
    "chat 1 Mi chars": lambda s, m, u: _calls(
        s, "apply_chat_template", {"messages": [{"role": "user", "content": "hi " * 349000}]}, u
    ),
    "detokenize 65,536 ids": lambda s, m, u: _calls(s, "detokenize", {"ids": [42] * 65536}, u),
    "10,000 requests unread": lambda s, m, u: _pipeline(s, u),
    "/.sys/ctl 60,000 lines": lambda s, m, u: _ctl(m, u),
}


def _flood(name: str, socket: str, mount: str | None, seconds: float) -> None:
    os.setgid(FLOOD_UID)
    os.setuid(FLOOD_UID)
    FLOODS[name](socket, mount, time.monotonic() + seconds)


def hello_latencies(socket: str, seconds: float) -> list[float]:
    with connect(socket) as lip:
        times = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            lip.call("hello")
            times.append(time.perf_counter() - t0)
            time.sleep(0.002)
    return sorted(times)


def summary(times: list[float]) -> dict[str, float]:
    return {
        "calls": len(times),
        "median_ms": times[len(times) // 2] * 1e3,
        "p99_ms": times[int(0.99 * (len(times) - 1))] * 1e3,
        "max_ms": times[-1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 1.5 if args.quick else 4.0
    folder = tempfile.mkdtemp(prefix="symphony-bench-floods-")
    os.chmod(folder, 0o755)  # the floods run as another uid
    socket = os.path.join(folder, "s.sock")
    mount = None
    if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        mount = os.path.join(folder, "kv")
        os.mkdir(mount)
    server = start_server(socket, mount=mount)
    results: dict[str, dict[str, float]] = {}
    try:
        results["idle"] = summary(hello_latencies(socket, seconds))
        for name in FLOODS:
            if name.startswith("/.sys") and mount is None:
                continue
            flood = multiprocessing.get_context("fork").Process(
                target=_flood, args=(name, socket, mount, seconds + 1.0)
            )
            flood.start()
            time.sleep(0.5)  # under way
            results[name] = summary(hello_latencies(socket, seconds))
            flood.join(seconds + 30)
            if flood.is_alive():
                flood.kill()
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)
    head = f"{'root hello while':28s} {'calls':>6s} {'median ms':>10s} {'p99 ms':>8s}"
    print(f"{head} {'max ms':>8s}")
    for name, row in results.items():
        print(
            f"{name:28s} {row['calls']:6d} {row['median_ms']:10.2f} {row['p99_ms']:8.2f} "
            f"{row['max_ms']:8.2f}"
        )
    save_results("floods", results, seconds=seconds, target_p99_ms=50)
    plot(results)


def plot(results: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import RESULTS

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, [results[n]["p99_ms"] for n in names], color="tab:blue")
    ax.axvline(50, color="tab:red", linestyle="--", label="target 50 ms")
    ax.set_xlabel("root's hello p99 latency (ms)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "floods.png", dpi=120)


if __name__ == "__main__":
    main()
