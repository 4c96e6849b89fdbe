"""The FUSE handlers without a mount: a filesystem object over a tiny store, and the
errno a handler ends with."""

from __future__ import annotations

import pyfuse3
import pytest
import trio

from symphony.fs.fuse_cache import KernelCache
from symphony.fs.fuse_ops import KVFileSystem
from symphony.fs.fuse_sys import SysTree
from symphony.fs.store import KVStore
from tests.conftest import make_tiny_engine


def make_ops() -> KVFileSystem:
    engine = make_tiny_engine(num_pages=8, page_size=4)
    store = KVStore(engine.pool, engine.fingerprint, engine.model_config.vocab_size, 64)
    tree = SysTree(store, engine.tokenizer, lambda name, cred: "", None)
    return KVFileSystem(store, tree, KernelCache(store))


def errno_of(coroutine_fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(coroutine_fn, *args)
    return info.value.errno
