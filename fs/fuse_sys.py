"""The mount's /.sys tree: the server's state as text, per-file views, and a control file.

    /.sys/status   model, device, pool pages, files, processes, steps, tokens/s
    /.sys/procs    one line a program
    /.sys/metrics  Prometheus text exposition
    /.sys/ctl      open it, write a command line (a syscall as text), read the reply
    /.sys/text/PATH    the text of KV file PATH (its tokens decoded)
    /.sys/tokens/PATH  one line a token of PATH: position, id, the token's text (JSON)

The views mirror the namespace with the owner, group and mode of each node (write
bits cleared), so the kernel lets exactly those who may read a KV file read its text.
Everything but ctl is read-only. Files are made when opened, so reads see a snapshot;
a stat gives the length last made (reads are direct_io: they see what open made).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyfuse3

from symphony.engine.tokenizer import Tokenizer
from symphony.fs.namespace import ROOT_INODE
from symphony.fs.nodes import Cred, Directory, KVFile, Node
from symphony.fs.store import KVStore

SYS_DIR = 1 << 62
SYS_FILES = ("status", "procs", "metrics", "ctl")  # /.sys/NAME is inode SYS_DIR + 1 + index
CTL = SYS_DIR + 1 + SYS_FILES.index("ctl")
VIEWS = ("text", "tokens")  # /.sys/VIEW/PATH is inode view_base(VIEW) + PATH's inode
VIEW_SHIFT = 56
FIRST_VIRTUAL = 1 << VIEW_SHIFT  # the store's own inodes stay below


def view_base(view: int) -> int:
    return (view + 1) << VIEW_SHIFT


def split_view(inode: int) -> tuple[int, int]:
    """(view index, store inode) of a view inode."""
    return (inode >> VIEW_SHIFT) - 1, inode & (FIRST_VIRTUAL - 1)


def is_virtual(inode: int) -> bool:
    return inode >= FIRST_VIRTUAL


def _is_sys_file(inode: int) -> bool:
    return SYS_DIR < inode <= SYS_DIR + len(SYS_FILES)


class ControlChannel(Protocol):
    """One open /.sys/ctl: commands written in, replies read out (made by the server)."""

    async def send(self, data: bytes) -> None:
        """Take written bytes; waits while too many of the opener's lines are queued."""
        ...

    async def receive(self, size: int) -> bytes:
        """Up to `size` bytes of reply, waiting for a command in flight; b'' when idle."""
        ...

    def close(self) -> None: ...


@dataclass
class SysHandle:
    inode: int
    text: bytes = b""
    ctl: ControlChannel | None = None


class SysTree:
    """Lookup, attributes, listings and file handles of every inode under /.sys."""

    def __init__(
        self,
        store: KVStore,
        tokenizer: Tokenizer | None,
        sys_text: Callable[[str, Cred], str],
        open_ctl: Callable[[Cred, int, bool], ControlChannel] | None,
    ) -> None:
        self.store = store
        self.tokenizer = tokenizer
        self.sys_text = sys_text  # the text of /.sys/NAME, made when it is read
        self.open_ctl = open_ctl  # None: the server offers no control file
        # the length of each /.sys file as last made: a stat must not make the text (the
        # status runs the store's whole check); reads are direct_io, so they see it all
        self._sizes: dict[int, int] = {}

    # names and attributes -------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        if parent == SYS_DIR:
            found = next((i for i, n in self.entries(SYS_DIR) if n == name), None)
        else:
            view, directory = self._view_dir(parent)
            child = directory.children.get(os.fsdecode(name))
            found = None if child is None else view_base(view) + child
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def entries(self, inode: int) -> list[tuple[int, bytes]]:
        if inode == SYS_DIR:
            names = [*SYS_FILES, *VIEWS] if self.open_ctl else [*SYS_FILES[:-1], *VIEWS]
            return [(self._top_inode(n), n.encode()) for n in names]
        view, directory = self._view_dir(inode)
        base = view_base(view)
        return [(base + i, os.fsencode(n)) for n, i in sorted(directory.children.items())]

    def _view_dir(self, inode: int) -> tuple[int, Directory]:
        """(view index, the store's directory) of a view directory's inode."""
        view, real = split_view(inode)
        node = self._real(real)
        if not isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return view, node

    @staticmethod
    def _top_inode(name: str) -> int:
        if name in VIEWS:
            return view_base(VIEWS.index(name)) + ROOT_INODE
        return SYS_DIR + 1 + SYS_FILES.index(name)

    def _real(self, inode: int) -> Node:
        node = self.store.ns.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attrs(self, inode: int, a: pyfuse3.EntryAttributes) -> None:
        """Fill `a` for a /.sys inode (never cached by the kernel: the text changes)."""
        a.entry_timeout = a.attr_timeout = 0
        root = self.store.ns.root
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = root.mtime_ns
        if inode == SYS_DIR:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2 + len(VIEWS)
        elif _is_sys_file(inode):
            a.st_mode, a.st_nlink = stat.S_IFREG | (0o666 if inode == CTL else 0o444), 1
            a.st_size = self._sizes.get(inode, 0)
        else:
            node = self._real(split_view(inode)[1])
            a.st_mode = node.mode & ~0o222
            a.st_nlink = node.nlink if node.is_dir else 1
            a.st_uid, a.st_gid = node.uid, node.gid
            a.st_atime_ns, a.st_mtime_ns = node.atime_ns, node.mtime_ns
            a.st_ctime_ns = node.ctime_ns

    def _sys_bytes(self, inode: int, cred: Cred) -> bytes:
        text = self.sys_text(SYS_FILES[inode - SYS_DIR - 1], cred).encode()
        self._sizes[inode] = len(text)
        return text

    # file handles ---------------------------------------------------------------------

    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext, cred: Cred) -> SysHandle:
        if inode == CTL:
            if self.open_ctl is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            reading = flags & os.O_ACCMODE != os.O_WRONLY
            return SysHandle(inode, ctl=self.open_ctl(cred, ctx.pid, reading))
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        if _is_sys_file(inode):
            return SysHandle(inode, self._sys_bytes(inode, cred))
        view, real = split_view(inode)
        node = self._real(real)
        if not isinstance(node, KVFile):
            raise pyfuse3.FUSEError(errno.EISDIR)
        return SysHandle(inode, self.render(VIEWS[view], node.token_ids).encode())

    def render(self, view: str, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f"{i}\t{t}\n" for i, t in enumerate(token_ids))
        if view == "text":
            return self.tokenizer.decode(token_ids)
        decode = self.tokenizer.decode
        return "".join(
            f"{i}\t{t}\t{json.dumps(decode([t]), ensure_ascii=False)}\n"
            for i, t in enumerate(token_ids)
        )

    async def read(self, handle: SysHandle, off: int, size: int) -> bytes:
        if handle.ctl is not None:
            return await handle.ctl.receive(size)
        return handle.text[off : off + size]

    async def write(self, handle: SysHandle, buf: bytes) -> int:
        if handle.ctl is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await handle.ctl.send(buf)
        return len(buf)

    def release(self, handle: SysHandle) -> None:
        if handle.ctl is not None:
            handle.ctl.close()
