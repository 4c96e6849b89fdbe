"""KV files opened on the mount: the handles, and the bytes that go through them.

A file opened for reading is a snapshot: its layout and its pages, held so that a
truncate or an append meanwhile changes nothing the reader sees (read: an export). A
file opened for writing while empty takes an import, committed at close (flush). Every
store error maps to its errno (`guard_handlers`); nothing else escapes a handler.

Threads: every handler runs on the trio thread, as do the store's changes made by the
syscalls, so none of them races another. The engine's worker thread writes only the
slots past a file's committed tokens, in pages the file alone holds; the pages a reader
or a save holds are shared, so an append copies them before writing (copy-on-write).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from symphony.fs import fuse_grammar, kv_format
from symphony.fs.errors import StoreError
from symphony.fs.fuse_cache import KernelCache
from symphony.fs.fuse_sys import CTL as SYS_CTL
from symphony.fs.fuse_sys import SysHandle, SysTree, is_virtual
from symphony.fs.grammar import Grammar, parse_record
from symphony.fs.kv_import import Importer, digest_of
from symphony.fs.nodes import Cred, KVFile, Node
from symphony.fs.store import KVStore

log = logging.getLogger(__name__)


@dataclass
class OpenFile:
    """A KV file opened: for reading, a snapshot of its bytes, its pages held; for
    writing from empty, an import."""

    file: KVFile
    layout: kv_format.Layout | None
    pages: list[int]
    cred: Cred  # the opener's: writes arrive without credentials (direct_io)
    importer: Importer | None = None  # opened for writing an empty file: an import
    last_page: tuple[int, bytes] | None = None  # (index, bytes) of the page read last
    domain: str = ""  # the reader's: the pages it reads may be shared with its imports


def cred_of(ctx: pyfuse3.RequestContext) -> Cred:
    try:
        groups = frozenset(pyfuse3.get_sup_groups(ctx.pid))
    except (OSError, ValueError):
        groups = frozenset()
    return Cred(ctx.uid, ctx.gid, groups)


def guard_handlers(cls: type[pyfuse3.Operations]) -> type[pyfuse3.Operations]:
    """Wrap every request handler of `cls`: a store error becomes its errno; anything
    else is a bug, logged and answered with EIO, so that it never ends the mount (an
    exception escaping a handler would stop pyfuse3's main loop and the server with it)."""
    for name, handler in list(vars(cls).items()):
        if name.startswith("_") or not hasattr(pyfuse3.Operations, name):
            continue
        setattr(cls, name, _guarded(handler))
    return cls


def _guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def run(*args: Any) -> Any:
        try:
            return await handler(*args)
        except pyfuse3.FUSEError:
            raise
        except StoreError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("FUSE handler %s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return run


@guard_handlers
class FileHandles(pyfuse3.Operations):
    """The store, its open files and their bytes (the namespace is KVFileSystem's)."""

    def __init__(
        self,
        store: KVStore,
        sys_tree: SysTree,
        cache: KernelCache,
        write_through: Callable[[KVFile], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.sys = sys_tree
        self.cache = cache
        self.write_through = write_through  # fsync: persist one file (--state)
        self._handles: dict[int, OpenFile | SysHandle] = {}
        self._next_fh = itertools.count(1)
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}

    def _node(self, inode: int) -> Node:
        node = self.store.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        fh = next(self._next_fh)
        if is_virtual(inode):
            self._handles[fh] = self.sys.open(inode, flags, ctx, cred_of(ctx))
            return pyfuse3.FileInfo(fh=fh, direct_io=True, nonseekable=inode == SYS_CTL)
        node = self._node(inode)
        if not isinstance(node, KVFile):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:  # the kernel checked write permission
            if node.num_tokens:
                self.store.truncate_file(node, 0)
            else:
                node.touch()  # an empty file truncated is changed all the same (POSIX)
            self.cache.invalidate_attributes()
        cred = cred_of(ctx)
        if writing:
            return self._open_for_import(fh, node, cred)
        pages = list(node.pages)
        self.store.hold(pages)  # the snapshot's pages outlive a truncate meanwhile
        lay = kv_format.layout(
            self.store.pool,
            self.store.fingerprint,
            node.token_ids,
            len(pages),
            node.position_list(),
            None if node.grammar is None else node.grammar.record,
        )
        node.open_count += 1
        self._handles[fh] = OpenFile(node, lay, pages, cred, domain=self.store.domain_of(cred))
        # direct_io: readers see the file as it is now, not a kernel-cached older version
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _open_for_import(self, fh: int, node: KVFile, cred: Cred) -> pyfuse3.FileInfo:
        # an empty file takes an import; writing into a non-empty one is refused (EINVAL)
        importer = self.store.importer(cred) if node.num_tokens == 0 else None
        node.open_count += 1
        self._handles[fh] = OpenFile(node, None, [], cred, importer=importer)
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, SysHandle):
            return await self.sys.read(handle, off, size)
        if handle.layout is None:
            raise pyfuse3.FUSEError(errno.EBADF)  # opened for writing only
        return kv_format.read_range(handle.layout, off, size, functools.partial(self._page, handle))

    def _page(self, handle: OpenFile, index: int) -> bytes:
        """The bytes of the handle's `index`-th page; reads come in pieces of a page, so
        the last page read is kept. Every page read is noted by content for `cp` back in."""
        if handle.last_page is None or handle.last_page[0] != index:
            page = handle.pages[index]
            assert handle.layout is not None
            lay = handle.layout
            filled = kv_format.slots_filled(lay.num_tokens, lay.page_size, index)
            data = self.store.pool.page_bytes(page, filled)
            self.store.content.note(page, filled, digest_of(data), handle.domain)
            handle.last_page = (index, data)
        return handle.last_page[1]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if isinstance(handle, SysHandle):
            return await self.sys.write(handle, buf)
        self._drop_privileges(handle)
        if handle.importer is None:
            raise pyfuse3.FUSEError(errno.EINVAL)  # KV files are written whole, from empty
        magic = kv_format.MAGIC
        if off < len(magic) and buf[: len(magic) - off] != magic[off : off + len(buf)]:
            # refused now, not at the 12th byte: `echo text > f` must see its write fail
            raise StoreError(errno.EINVAL, "not a KV file: it must begin with the KV magic")
        handle.importer.write(off, buf)
        return len(buf)

    def _drop_privileges(self, handle: OpenFile) -> None:
        """A write by anyone but root clears set-user-ID, and set-group-ID where group
        execution is on, as the kernel does for filesystems it writes itself."""
        node = handle.file
        kill = stat.S_ISUID | (stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
        if handle.cred.is_root or not node.mode & kill:
            return
        node.mode &= ~kill
        node.touch(modified=False)
        self.cache.invalidate_attributes()

    async def flush(self, fh: int) -> None:
        """close(): a whole import is committed here, before close returns (release
        comes later); one that is neither empty nor whole fails, with EINVAL."""
        handle = self._handles.get(fh)
        if not isinstance(handle, OpenFile) or handle.importer is None:
            return
        importer = handle.importer
        if not importer.received:
            return  # nothing written yet (a copy of the descriptor closed, say)
        handle.importer = None
        if not importer.complete():
            importer.abort()
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            grammar = await self._imported_grammar(importer)
        except StoreError as exc:
            importer.abort()
            log.warning("import refused: %s", exc.args[0])
            raise pyfuse3.FUSEError(exc.errno) from None
        self.store.commit_import(handle.file, importer)
        if grammar is not None:
            self.store.constrain(handle.file, grammar)
        self.cache.invalidate_attributes()

    async def _imported_grammar(self, importer: Importer) -> Grammar | None:
        """The grammar an imported file's header carries, fed its tokens (a worker's
        work: it grows with them), or None."""
        assert importer.header is not None and importer.token_ids is not None
        record = importer.header.get("grammar")
        if record is None:
            return None
        grammars = self.store.grammars
        if grammars is None:
            raise StoreError(errno.ENOTSUP, "this server has no grammar compiler")
        spec, start = parse_record(record, len(importer.token_ids))
        tokens = importer.token_ids[start:]
        grammar: Grammar = await trio.to_thread.run_sync(
            grammars.replay, spec, start, tokens, limiter=fuse_grammar.COMPILING
        )
        return grammar

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, OpenFile) or self.write_through is None:
            return
        await self.write_through(handle.file)

    async def release(self, fh: int) -> None:
        self._close(fh)
        self.cache.invalidate_attributes()  # an unlinked file's pages may go now

    def _close(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        if isinstance(handle, SysHandle):
            self.sys.release(handle)
            return
        self.store.unhold(handle.pages)
        if handle.importer is not None:  # written to without a close (flush) seen
            handle.importer.abort()
        self.store.close(handle.file)

    def close_all(self) -> None:
        """The session is over: close every handle still open. An unmount from outside
        ends the session without a release for the files open through the mount; their
        reader holds, imports and open counts would otherwise keep pages to the end."""
        for fh in list(self._handles):
            try:
                self._close(fh)
            except Exception:  # one broken handle must not keep the others' pages
                log.exception("closing handle %d at the end of the session failed", fh)
        self._dirs.clear()
