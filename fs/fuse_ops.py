"""The KV store as a mounted filesystem: one pyfuse3 `Operations` over the store.

Handlers only touch the store's metadata and the pool's tensors; they never wait on
the engine. Every store error maps to its errno; nothing else escapes a handler.
It serves the namespace (lookup, readdir, mkdir, rmdir, unlink, rename, link, chmod,
chown, utimens, statfs) with names of UTF-8 up to NAME_MAX bytes, and the xattrs;
KV files in their byte format come from `FileHandles` (fuse_files.py), /.sys from
`SysTree`. Names and attributes are cached by the kernel; `KernelCache` invalidates
what the store changes behind its back.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pyfuse3
import trio

from symphony.fs import fuse_grammar, kv_format
from symphony.fs.errors import StoreError
from symphony.fs.fuse_cache import ENTRY_TIMEOUT
from symphony.fs.fuse_files import FileHandles, cred_of, guard_handlers
from symphony.fs.fuse_sys import CTL as SYS_CTL
from symphony.fs.fuse_sys import SYS_DIR, is_virtual
from symphony.fs.namespace import ROOT_INODE, Namespace, decode_name
from symphony.fs.nodes import W_OK, Cred, Directory, KVFile, Node, now_ns

XATTRS = (
    b"user.kv.tokens",
    b"user.kv.pages",
    b"user.kv.shared_pages",
    b"user.kv.model",
    b"user.kv.origin",
)
# Reading it recomputes the file (kv_verify) and gives a JSON report. Not listed, so that
# `getfattr -d`, `cp -a` or `rsync -X` do not recompute every file they touch.
VERIFY = b"user.kv.verify"
VERIFY_REUSE = 10.0  # seconds a report answers again (getfattr asks twice: size, value)
VERIFYING_PER_UID = 2  # verifications one uid may wait on at once through the mount


@guard_handlers
class KVFileSystem(FileHandles):
    """The store's namespace as FUSE sees it (open files and their bytes: FileHandles)."""

    # kv_verify for the user.kv.verify xattr, given by the server (it needs the engine)
    verify: Callable[[KVFile, Cred], Awaitable[dict[str, Any]]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (inode, ctime, tokens) -> (when, report): a report holds only for the file as it
        # was; one verification runs per file at a time, and a few per uid
        self._reports: dict[tuple[int, int, int], tuple[float, bytes]] = {}
        self._verifying: dict[tuple[int, int, int], trio.Event] = {}
        self._verifying_by_uid: Counter[int] = Counter()

    # attributes ---------------------------------------------------------------------

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one filesystem object per mount)
    def _size(self, num_tokens: int, num_pages: int, grammar_len: int | None) -> int:
        """A KV file's byte length (cached: `ls -l` of many files asks it often);
        `grammar_len`: its grammar's record's length in the header."""
        pool, fingerprint = self.store.pool, self.store.fingerprint
        return kv_format.size(pool, fingerprint, num_tokens, num_pages, grammar_len)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_blksize = self.store.pool.bytes_per_page
        if is_virtual(inode):
            self.sys.attrs(inode, a)
            return a
        a.entry_timeout = a.attr_timeout = ENTRY_TIMEOUT  # invalidated on every change
        node = self._node(inode)
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = node.mode, node.nlink, node.uid, node.gid
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.atime_ns, node.mtime_ns, node.ctime_ns
        if isinstance(node, KVFile):
            grammar = None if node.grammar is None else node.grammar.record_length
            a.st_size = self._size(node.num_tokens, len(node.pages), grammar)
            # du shows real memory: only the pages this file does not share, in 512-byte units
            own = len(node.pages) - self.store.num_shared(node)
            a.st_blocks = own * self.store.pool.bytes_per_page // 512
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            text = decode_name(name)
        except StoreError as exc:  # a name that is not UTF-8 names nothing here
            raise pyfuse3.FUSEError(
                errno.ENOENT if exc.errno == errno.EINVAL else exc.errno
            ) from None
        if is_virtual(parent_inode):
            return self._attrs(self.sys.lookup(parent_inode, name))
        if parent_inode == ROOT_INODE and name == b".sys":
            return self._attrs(SYS_DIR)
        parent = self._node(parent_inode)
        if not isinstance(parent, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = parent.children.get(text)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(child)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        if inode == SYS_CTL and fields.update_size and not attr.st_size:
            return self._attrs(inode)  # `echo CMD > /.sys/ctl` opens with O_TRUNC
        node = self._node_or_sys(inode)
        cred = cred_of(ctx)
        if fields.update_mode:
            Namespace.chmod_node(node, cred, attr.st_mode)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else None
            gid = attr.st_gid if fields.update_gid else None
            Namespace.chown_node(node, cred, uid, gid)
        importing = self._handles[fh].importer if fh in self._handles else None
        if fields.update_size and importing is not None and attr.st_size:
            importing.extend_to(attr.st_size)  # cp ending in a hole
        elif fields.update_size:
            if not isinstance(node, KVFile) or attr.st_size != 0:
                raise StoreError(
                    errno.EINVAL,
                    "a KV file truncates to 0 bytes only; roll back with the user.kv.tokens xattr",
                )
            self.store.truncate_file(node, 0)
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now_ns()
        self.cache.invalidate_attributes()  # a truncate changes what other files share
        return self._attrs(inode)

    def _node_or_sys(self, inode: int) -> Node:
        if is_virtual(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._node(inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        pool = self.store.pool
        s.f_bsize = s.f_frsize = pool.bytes_per_page  # a block is a page
        s.f_blocks = pool.num_pages
        cached = self.store.index.num_cached() if self.store.index is not None else 0
        s.f_bfree = s.f_bavail = pool.num_free + cached
        s.f_files = len(self.store.ns.nodes)
        s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s

    # directories --------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_virtual(inode):
            entries = [(name, ino) for ino, name in self.sys.entries(inode)]
        else:
            node = self._node(inode)
            if not isinstance(node, Directory):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            entries = [(os.fsencode(n), i) for n, i in sorted(node.children.items())]
            if inode == ROOT_INODE:
                entries.insert(0, (b".sys", SYS_DIR))
        fh = next(self._next_fh)
        self._dirs[fh] = entries  # a snapshot: readdir pages through it by index
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                attrs = self._attrs(inode)
            except pyfuse3.FUSEError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def _path(self, parent_inode: int, name: bytes) -> str:
        if is_virtual(parent_inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        text = decode_name(name)
        base = self.store.ns.path_of(parent_inode)
        return f"{base}/{text}" if base else text

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.store.ns.mkdir(self._path(parent_inode, name), cred_of(ctx), mode & ~ctx.umask)
        return self._attrs(node.inode)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.store.ns.rmdir(self._path(parent_inode, name), cred_of(ctx))
        self._changed()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.store.unlink(self._path(parent_inode, name), cred_of(ctx))
        self._changed()

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self.store.ns.rename(
            self._path(parent_inode_old, name_old),
            self._path(parent_inode_new, name_new),
            cred_of(ctx),
        )
        self._changed()

    def _changed(self) -> None:
        """After a change made through the kernel: it knows the names it removed, not
        which other files now share fewer pages."""
        self.cache.forget_removed()
        self.cache.invalidate_attributes()

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._node_or_sys(inode)
        if not isinstance(node, KVFile):
            raise pyfuse3.FUSEError(errno.EPERM)
        self.store.ns.link_node(node, self._path(new_parent_inode, new_name), cred_of(ctx))
        return self._attrs(inode)

    # xattrs -------------------------------------------------------------------------

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self.store.node(inode)
        if not isinstance(node, KVFile):
            return []
        return [*XATTRS, fuse_grammar.GRAMMAR] if node.grammar is not None else list(XATTRS)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # no security labels or ACLs here: saying so once spares `ls -l` asking per file
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self.store.node(inode)  # an open file unlinked answers as before
        if isinstance(node, KVFile) and name == VERIFY:
            return await self._verify(node, cred_of(ctx))
        if isinstance(node, KVFile) and name == fuse_grammar.GRAMMAR:
            return fuse_grammar.read(node)
        if not isinstance(node, KVFile) or name not in XATTRS:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = {
            b"user.kv.tokens": node.num_tokens,
            b"user.kv.pages": len(node.pages),
            b"user.kv.shared_pages": self.store.num_shared(node),
            b"user.kv.model": self.store.fingerprint,
            b"user.kv.origin": node.origin,
        }[name]
        return str(value).encode()

    async def _verify(self, node: KVFile, cred: Cred) -> bytes:
        if self.verify is None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        key = (node.inode, node.ctime_ns, node.num_tokens)
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] < VERIFY_REUSE}
        while key not in self._reports:
            running = self._verifying.get(key)
            if running is not None:  # another reader asked first: its report answers
                await running.wait()
                if key not in self._reports:
                    raise pyfuse3.FUSEError(errno.EAGAIN)
                break
            if self._verifying_by_uid[cred.uid] >= VERIFYING_PER_UID:
                raise pyfuse3.FUSEError(errno.EAGAIN)
            done = self._verifying[key] = trio.Event()
            self._verifying_by_uid[cred.uid] += 1
            try:
                report = await self.verify(node, cred)
            finally:
                self._verifying_by_uid[cred.uid] -= 1
                del self._verifying[key]
                done.set()
            value = json.dumps(report).encode()
            # under the key of the file as it is now too (adopting changes its ctime)
            for k in {key, (node.inode, node.ctime_ns, node.num_tokens)}:
                self._reports[k] = (time.monotonic(), value)
            self.cache.invalidate_attributes()
        return self._reports[key][1]

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self.store.node(inode)
        if isinstance(node, KVFile) and name == fuse_grammar.GRAMMAR:
            await fuse_grammar.write(self.store, node, value, cred_of(ctx))
            self.cache.invalidate_attributes()  # the size counts the grammar
            return
        if not isinstance(node, KVFile) or name != b"user.kv.tokens":
            raise pyfuse3.FUSEError(errno.EPERM if name in (*XATTRS, VERIFY) else errno.ENOTSUP)
        try:
            n = int(value.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        self.store.ns.check(node, cred_of(ctx), W_OK, "")
        self.store.truncate_file(node, n)  # rollback
        self.cache.invalidate_attributes()

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.store.node(inode)
        if not isinstance(node, KVFile) or name != fuse_grammar.GRAMMAR:
            raise pyfuse3.FUSEError(errno.EPERM if name in (*XATTRS, VERIFY) else pyfuse3.ENOATTR)
        fuse_grammar.remove(self.store, node, cred_of(ctx))
        self.cache.invalidate_attributes()

    # files and the node types the store has not -------------------------------------

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        cred = cred_of(ctx)
        path = self._path(parent_inode, name)
        node = self.store.ns.create_file(path, cred, mode & ~ctx.umask, self.store.domain_of(cred))
        return self._open_for_import(next(self._next_fh), node, cred), self._attrs(node.inode)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        decode_name(name)  # a name too long is that first, as elsewhere
        raise StoreError(errno.EPERM, "the store holds no symbolic links")

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # EPERM, as Linux answers for a filesystem without them (FIFOs, devices, sockets)
        decode_name(name)
        raise StoreError(errno.EPERM, "the store holds KV files and directories only")
