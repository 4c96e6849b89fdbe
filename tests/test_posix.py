"""POSIX answers of the namespace and the FUSE handlers, called directly (no mount)."""

from __future__ import annotations

import errno
import os
import threading
import time
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from symphony.fs.errors import StoreError
from symphony.fs.fuse_cache import KernelCache
from symphony.fs.fuse_ops import KVFileSystem
from symphony.fs.fuse_sys import SYS_DIR, SYS_FILES, SysTree
from symphony.fs.namespace import Namespace
from symphony.fs.nodes import ROOT, Cred
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine
from tests.fuse_helpers import errno_of, make_ops

USER = Cred(1000, 1000)
CTX = pyfuse3.RequestContext()  # root, as the kernel's own checks already passed


@pytest.fixture
def ops() -> KVFileSystem:
    return make_ops()


def store_errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreError) as info:
        fn(*args)
    return info.value.errno


def test_makedirs_walks_once_and_keeps_mkdir_rules():
    ns = Namespace(lambda f: None, root_mode=0o777)
    ns.mkdir("a", ROOT, 0o755)  # root's: others may search it, not write in it
    ns.makedirs("a", ROOT)
    ns.makedirs("u/v/w", USER, 0o700)
    assert ns.lookup("u/v/w", USER).uid == USER.uid
    ns.makedirs("u/v", USER)  # all there: fine
    assert store_errno(ns.makedirs, "a/b", USER) == errno.EACCES
    ns.create_file("u/f.kv", USER, 0o600, "")
    assert store_errno(ns.makedirs, "u/f.kv/x", USER) == errno.ENOTDIR
    assert store_errno(ns.makedirs, "u/f.kv", USER) == errno.EEXIST
    deep = "/".join(["d"] * 4000)
    started = time.monotonic()
    ns.makedirs(deep, USER)  # one walk: a mkdir per prefix from the root was quadratic
    assert time.monotonic() - started < 2.0
    assert ns.lookup(deep, USER).is_dir


def test_deep_trees_rename_without_recursion():
    ns = Namespace(lambda f: None)
    path = "top"
    ns.mkdir(path, ROOT)
    for _ in range(1200):
        path += "/d"
        ns.mkdir(path, ROOT)
    ns.rename("top", "moved", ROOT)
    deep = "moved/" + "/".join(["d"] * 1200)
    assert ns.path_of(ns.lookup(deep, ROOT).inode) == deep
    assert store_errno(ns.rename, "moved", deep + "/inside", ROOT) == errno.EINVAL


def test_names_too_long_or_not_utf8_get_their_errno(ops):
    long = b"n" * 256
    assert errno_of(ops.lookup, 1, long, CTX) == errno.ENAMETOOLONG
    assert errno_of(ops.lookup, SYS_DIR, long, CTX) == errno.ENAMETOOLONG
    assert errno_of(ops.mkdir, 1, long, 0o755, CTX) == errno.ENAMETOOLONG
    assert errno_of(ops.create, 1, long, 0o644, os.O_WRONLY, CTX) == errno.ENAMETOOLONG
    ops.store.ns.mkdir("d", ROOT)
    assert errno_of(ops.rename, 1, b"d", 1, long, 0, CTX) == errno.ENAMETOOLONG
    assert errno_of(ops.lookup, 1, b"\xff", CTX) == errno.ENOENT  # none can exist
    assert errno_of(ops.mkdir, 1, b"\xff", 0o755, CTX) == errno.EINVAL
    assert errno_of(ops.rename, 1, b"d", 1, b"bad\xfe", 0, CTX) == errno.EINVAL
    assert errno_of(ops.lookup, 1, b"n" * 255, CTX) == errno.ENOENT


def test_symlinks_and_special_files_are_eperm(ops):
    assert errno_of(ops.symlink, 1, b"l", b"target", CTX) == errno.EPERM
    assert errno_of(ops.mknod, 1, b"fifo", 0o10644, 0, CTX) == errno.EPERM


def test_an_open_unlinked_file_keeps_its_xattrs(ops):
    async def scenario() -> bytes:
        info, attrs = await ops.create(1, b"f.kv", 0o644, os.O_WRONLY, CTX)
        ops.store.unlink("f.kv", ROOT)
        names = await ops.listxattr(attrs.st_ino, CTX)
        assert b"user.kv.tokens" in names
        value = await ops.getxattr(attrs.st_ino, b"user.kv.tokens", CTX)
        await ops.release(info.fh)
        return value

    assert trio.run(scenario) == b"0"
    ops.store.check_invariants()


def test_o_trunc_of_an_empty_file_marks_it_changed(ops):
    file = ops.store.ns.create_file("e.kv", ROOT, 0o644, "")
    file.mtime_ns = file.ctime_ns = 0

    async def scenario() -> None:
        info = await ops.open(file.inode, os.O_WRONLY | os.O_TRUNC, CTX)
        await ops.release(info.fh)

    trio.run(scenario)
    assert file.mtime_ns > 0 and file.ctime_ns > 0


def test_a_write_that_cannot_begin_a_kv_file_is_refused_at_once(ops):
    async def scenario() -> int:
        info, _ = await ops.create(1, b"t.kv", 0o644, os.O_WRONLY, CTX)
        with pytest.raises(pyfuse3.FUSEError) as refused:
            await ops.write(info.fh, 0, b"test\n")  # `echo test > t.kv`
        await ops.flush(info.fh)  # nothing was written: the close is fine
        await ops.release(info.fh)
        info, _ = await ops.create(1, b"u.kv", 0o644, os.O_WRONLY, CTX)
        assert await ops.write(info.fh, 0, b"SYM") == 3  # a real start is fine
        with pytest.raises(pyfuse3.FUSEError):
            await ops.write(info.fh, 3, b"xx")  # the rest of the magic differs
        await ops.release(info.fh)
        return refused.value.errno

    assert trio.run(scenario) == errno.EINVAL
    assert ops.store.ns.lookup_file("t.kv", ROOT).num_tokens == 0
    ops.store.check_invariants()


def test_the_end_of_a_session_closes_what_it_left_open(ops):
    store = ops.store
    file = store.ns.create_file("r.kv", ROOT, 0o644, "")
    file.pages = store.allocate(1)  # a file with one page of 2 tokens, as an import makes
    file.token_ids = [1, 2]

    async def scenario() -> None:
        await ops.open(file.inode, os.O_RDONLY, CTX)  # a reader: holds the page
        await ops.create(1, b"w.kv", 0o644, os.O_WRONLY, CTX)  # an import, not closed

    trio.run(scenario)
    store.unlink("r.kv", ROOT)
    ops.close_all()  # the kernel sends no release once the session is gone
    store.check_invariants()
    assert store.status()["pages"]["used"] == 0
    assert store.node(file.inode) is None


def test_invariants_hold_while_two_imports_run(ops):
    store = ops.store
    lip = ops.store.ns.create_file("src.kv", ROOT, 0o644, "")
    lip.pages, lip.token_ids = store.allocate(1), [1, 2, 3]

    async def scenario() -> None:
        first, _ = await ops.create(1, b"a.kv", 0o644, os.O_WRONLY, CTX)
        await ops.create(1, b"b.kv", 0o644, os.O_WRONLY, CTX)  # made while a has no page
        reader = await ops.open(lip.inode, os.O_RDONLY, CTX)
        data = await ops.read(reader.fh, 0, 1 << 20)
        await ops.write(first.fh, 0, data)  # a takes a page now
        store.check_invariants()

    trio.run(scenario)


def test_a_stat_of_sys_status_does_not_make_its_text():
    engine = make_tiny_engine(num_pages=8, page_size=4)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    made: list[str] = []

    def text(name: str, cred: Cred) -> str:
        made.append(name)
        return "pages_used 0\ninvariants ok\n"

    ops = KVFileSystem(store, SysTree(store, engine.tokenizer, text, None), KernelCache(store))
    status = SYS_DIR + 1 + SYS_FILES.index("status")

    async def scenario() -> bytes:
        for _ in range(3):
            await ops.lookup(SYS_DIR, b"status", CTX)
            await ops.getattr(status, CTX)
        assert made == []  # the status runs the store's whole check: never on a stat
        info = await ops.open(status, os.O_RDONLY, CTX)
        data = await ops.read(info.fh, 0, 4096)
        await ops.release(info.fh)
        assert (await ops.getattr(status, CTX)).st_size == len(data)
        return data

    assert trio.run(scenario).endswith(b"invariants ok\n")
    assert made == ["status"]


def test_fsync_writes_a_snapshot_in_a_worker_thread(tmp_path):
    from symphony.fs.persistence import StateDir
    from symphony.sched.mount import Mount

    engine = make_tiny_engine(num_pages=8, page_size=4)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    file = store.ns.create_file("f.kv", ROOT, 0o644, "")
    file.pages, file.token_ids = store.allocate(1), [1, 2]
    state = StateDir(tmp_path / "state", store)
    seen: list[tuple[bool, int]] = []
    write = state.write

    def watched_write(save, tree):  # type: ignore[no-untyped-def]
        on_main = threading.current_thread() is threading.main_thread()
        seen.append((on_main, store.pool.refcounts[save.pages[0]]))
        write(save, tree)

    state.write = watched_write  # type: ignore[method-assign]
    server = SimpleNamespace(store=store, state=state)
    mount = Mount(server, "/nonexistent")  # type: ignore[arg-type]
    trio.run(mount.save_file, file)
    assert seen == [(False, 2)]  # in a thread, the page held meanwhile
    assert store.pool.refcounts[file.pages[0]] == 1
    store.check_invariants()
    restored = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    store.unlink("f.kv", ROOT)
    assert StateDir(tmp_path / "state", restored).restore() == 1
    assert restored.ns.lookup_file("f.kv", ROOT).token_ids == [1, 2]
