"""The mounted store: ls -l of 10,000 files, cp-fork and restore-by-cp of a 4,096-token
context, syscall latency under filesystem traffic. Needs /dev/fuse and root.

    python bench/mount.py [--quick]

Starts `lipctl serve --mount` on the embedded model; prints a table, writes
bench/results/mount.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

from common import round_trips, save_results  # bench/common.py

from symphony.lipctl import connect
from symphony.lipctl.launch import start_server, stop_server


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def used_pages(lip) -> int:  # type: ignore[no-untyped-def]
    return int(lip.status()["pages"]["used"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("bench/mount.py: skipped, this machine has no /dev/fuse or fusermount3")
        return
    n_files, n_tokens = (1000, 512) if args.quick else (10_000, 4096)
    folder = tempfile.mkdtemp(prefix="symphony-bench-mount-")
    mount, socket = os.path.join(folder, "kv"), os.path.join(folder, "s.sock")
    os.mkdir(mount)
    server = start_server(socket, "--pages", "2048", mount=mount)
    results: dict = {}
    try:
        with connect(socket) as lip:
            lip.mkdir("many")
            for i in range(n_files):
                lip.kv(f"many/f{i}.kv", create=True)
            results["ls_l_seconds"] = timed(["ls", "-l", os.path.join(mount, "many")])
            results["ls_l_files"] = n_files

            kv = lip.kv("big.kv", create=True)
            words = lip.tokenize("the river bends past the mill where farmers bring grain ")
            ids = (words * (n_tokens // len(words) + 1))[:n_tokens]
            t0 = time.perf_counter()
            kv.append(ids)
            results["prefill_seconds"] = time.perf_counter() - t0
            big = os.path.join(mount, "big.kv")
            results["file_mb"] = os.stat(big).st_size / 1e6
            # interleaved, medians of 5: this machine is shared and noisy
            cats, forks = [], []
            before = used_pages(lip)
            for i in range(5):
                cats.append(timed(["sh", "-c", f"cat {big} > /dev/null"]))
                forks.append(timed(["cp", big, os.path.join(mount, f"fork{i}.kv")]))
            results["cp_fork_pages_allocated"] = used_pages(lip) - before
            for i in range(1, 5):
                os.unlink(os.path.join(mount, f"fork{i}.kv"))
            os.rename(os.path.join(mount, "fork0.kv"), os.path.join(mount, "fork.kv"))
            results["cat_seconds"] = statistics.median(cats)
            results["cp_fork_seconds"] = statistics.median(forks)
            pairs = zip(forks, cats, strict=True)
            results["cp_fork_over_cat"] = [round(f / c, 2) for f, c in pairs]
            saved = os.path.join(folder, "saved.kv")
            timed(["cp", big, saved])
            os.unlink(big)
            os.unlink(os.path.join(mount, "fork.kv"))
            results["restore_by_cp_seconds"] = timed(["cp", saved, os.path.join(mount, "back.kv")])
            results["restore_speedup"] = (
                results["prefill_seconds"] / results["restore_by_cp_seconds"]
            )

            results["rtt_idle_us"] = round_trips(socket, 1000)["median_us"]
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    subprocess.run(
                        ["cat", os.path.join(mount, "back.kv")],
                        stdout=subprocess.DEVNULL,
                        check=False,
                    )
                    os.listdir(os.path.join(mount, "many"))

            worker = threading.Thread(target=traffic)
            worker.start()
            try:
                results["rtt_busy_fs_us"] = round_trips(socket, 1000)["median_us"]
            finally:
                stop.set()
                worker.join()
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)
    r = results
    print(f"ls -l of {r['ls_l_files']} files: {r['ls_l_seconds']:.2f} s")
    print(
        f"{n_tokens}-token file ({r['file_mb']:.0f} MB): cat {r['cat_seconds']:.2f} s, cp-fork "
        f"{r['cp_fork_seconds']:.2f} s ({r['cp_fork_seconds'] / r['cat_seconds']:.2f}x cat; "
        f"medians of 5, each pair {r['cp_fork_over_cat']}), "
        f"{r['cp_fork_pages_allocated']} pages allocated by 5 forks"
    )
    print(
        f"restore by cp {r['restore_by_cp_seconds']:.2f} s vs prefill {r['prefill_seconds']:.2f}"
        f" s: {r['restore_speedup']:.1f}x"
    )
    print(
        f"syscall round trip: {r['rtt_idle_us']:.0f} us idle, {r['rtt_busy_fs_us']:.0f} us "
        "under filesystem traffic (medians)"
    )
    print(f"wrote {save_results('mount', r, quick=args.quick)}")


if __name__ == "__main__":
    main()
