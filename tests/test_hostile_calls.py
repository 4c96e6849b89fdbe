"""Smaller isolation defects of the syscalls, each played by another uid or a LIP."""

from __future__ import annotations

import subprocess
import sys

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred
from symphony.lipctl import connect

OTHER = Cred(65534, 65534)


def test_anything_that_reveals_content_needs_read(tiny_server):
    server = tiny_server
    with connect(server.server.config.socket_path) as lip:
        kv = lip.kv("drop.kv", create=True, mode=0o622)  # others may write, not read
        kv.append(lip.tokenize("secret"))
    for extra in [
        {"sampler": {}},
        {"sampler": {"temperature": 0}},
        {"outputs": [{"top_k": 1}]},
        {"outputs": [{"entropy": True}]},
        {"outputs": [{"at": -1, "logits": True}]},
        {"keep": False},
    ]:
        got = server.call_as(OTHER, "forward", path="drop.kv", tokens=[5], **extra)
        assert isinstance(got, StoreError) and got.errno_name == "EACCES", extra
    # a blind append is what w allows
    got = server.call_as(OTHER, "forward", path="drop.kv", tokens=[5])
    assert got["tokens"] == 7 and got["outputs"] == []
    server.run_sync(server.server.store.check_invariants)


DRAWS = """
import sys
from symphony.lipctl import connect
with connect(sys.argv[1]) as lip:
    kv = lip.kv("seeded.kv", create=True)
    kv.truncate(0)
    kv.append([1, 2, 3])
    out = []
    for _ in range(12):  # the same context each time: only the draw can differ
        kv.truncate(3)
        out.append(kv.forward([4], temperature=5.0, seed=11).token)
print(*out)
"""


def test_a_seed_names_a_stream_that_advances(tiny_server):
    """A per-token LIP with one seed gets fresh draws; the same seed in a new program
    starts the same stream again."""

    def draws() -> list[str]:
        argv = [sys.executable, "-c", DRAWS, tiny_server.server.config.socket_path]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.split()

    first = draws()
    assert len(set(first)) > 1  # at temperature 5 over 259 tokens, 12 equal draws: no stream
    assert draws() == first


def test_a_trailing_slash_never_names_a_file(tiny_server):
    from symphony.lipctl import SymphonyError

    with connect(tiny_server.server.config.socket_path) as lip:
        for call, errno_name in [
            (lambda: lip.kv("pp/", create=True), "EISDIR"),
            (lambda: lip.kv("pp/", create=True, exclusive=True), "EISDIR"),
        ]:
            try:
                call()
            except SymphonyError as exc:
                assert exc.errno == errno_name
            else:
                raise AssertionError("a file named by a trailing slash")
        assert "pp" not in lip.listdir()
        lip.kv("qq", create=True)
        try:
            lip.kv("qq/")
        except SymphonyError as exc:
            assert exc.errno == "ENOTDIR"
        else:
            raise AssertionError("a file opened through a trailing slash")


def test_trailing_slashes_after_a_file_are_enotdir(tiny_server):
    from symphony.fs.nodes import ROOT

    ns = tiny_server.server.store.ns

    def run() -> list[str]:
        ns.create_file("qq", ROOT, 0o600, "")
        out = []
        for call in [
            lambda: ns.unlink("qq/", ROOT),
            lambda: ns.rename("qq", "rr/", ROOT),
            lambda: ns.rename("qq/", "rr", ROOT),
            lambda: ns.link("qq", "ll/", ROOT),
        ]:
            try:
                call()
                out.append("done")
            except StoreError as exc:
                out.append(exc.errno_name)
        return out

    assert tiny_server.run_sync(run) == ["ENOTDIR"] * 4
    assert tiny_server.run_sync(ns.listdir, "", ROOT) == ["qq"]
