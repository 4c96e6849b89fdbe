"""FUSE handlers called directly (no mount): errors become errnos, bugs become EIO."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from symphony.fs.fuse_ops import KVFileSystem
from symphony.fs.nodes import ROOT
from tests.fuse_helpers import errno_of, make_ops


@pytest.fixture
def ops() -> KVFileSystem:
    return make_ops()


def test_store_errors_become_their_errno(ops):
    ctx = pyfuse3.RequestContext()
    assert errno_of(ops.getattr, 12345, ctx) == errno.ENOENT
    ops.store.ns.mkdir("d", ROOT)
    assert errno_of(ops.mkdir, 1, b"d", 0o755, ctx) == errno.EEXIST
    assert errno_of(ops.rmdir, 1, b"missing", ctx) == errno.ENOENT
    assert errno_of(ops.getxattr, 1, b"security.selinux", ctx) == errno.ENOTSUP


def test_a_bug_in_a_handler_is_eio_and_logged_not_a_dead_mount(ops, monkeypatch, caplog):
    def broken(inode: int) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.store.ns, "path_of", broken)
    with caplog.at_level(logging.ERROR):
        assert errno_of(ops.mkdir, 1, b"x", 0o755, pyfuse3.RequestContext()) == errno.EIO
    assert "FUSE handler mkdir failed" in caplog.text
    # the filesystem goes on answering
    attrs = trio.run(ops.getattr, 1, pyfuse3.RequestContext())
    assert attrs.st_ino == 1
