"""The user.kv.grammar xattr: a file's grammar as JSON, read, set and removed.

    getfattr -n user.kv.grammar f.kv           {"regex": "[0-9]+"}
    setfattr -n user.kv.grammar -v '{"json_object": true}' f.kv
    setfattr -x user.kv.grammar f.kv           the file is free again

Setting the grammar a file already has changes nothing, so `cp -a` (which copies the
xattrs after the bytes, whose header already carried the grammar) keeps the copy's
matcher where the source's stood.
"""

from __future__ import annotations

import errno
import json
import logging

import trio

from symphony.fs.errors import StoreError
from symphony.fs.grammar import GrammarSpec
from symphony.fs.nodes import W_OK, Cred, KVFile
from symphony.fs.store import KVStore

GRAMMAR = b"user.kv.grammar"
# grammars compiled and replayed for the mount (setfattr, imports) at once, at most: a
# shell loop of setfattr must not take every worker thread
COMPILING = trio.CapacityLimiter(2)

log = logging.getLogger(__name__)


def read(file: KVFile) -> bytes:
    """The file's grammar spec as JSON.

    Raises:
        StoreError: ENODATA when it has none.
    """
    if file.grammar is None:
        raise StoreError(errno.ENODATA, "the file has no grammar")
    return json.dumps(file.grammar.spec.wire()).encode()


async def write(store: KVStore, file: KVFile, value: bytes, cred: Cred) -> None:
    """Attach the grammar `value` gives (JSON), compiled in a worker thread."""
    store.ns.check(file, cred, W_OK, "")
    try:
        spec = GrammarSpec.from_wire(json.loads(value))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StoreError(errno.EINVAL, "user.kv.grammar takes a grammar as JSON") from None
    if file.grammar is not None and file.grammar.spec == spec:
        return
    grammars = store.grammars
    if grammars is None:
        raise StoreError(errno.ENOTSUP, "this server has no grammar compiler")
    try:
        grammar = await trio.to_thread.run_sync(grammars.compile, spec, limiter=COMPILING)
    except StoreError as exc:
        log.info("user.kv.grammar refused: %s", exc.args[0])
        raise
    store.constrain(file, grammar)


def remove(store: KVStore, file: KVFile, cred: Cred) -> None:
    store.ns.check(file, cred, W_OK, "")
    if file.grammar is None:
        raise StoreError(errno.ENODATA, "the file has no grammar")
    store.constrain(file, None)
