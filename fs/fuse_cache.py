"""Keeping the kernel's caches of the mount true to the store.

The kernel caches every name and attribute the filesystem hands it (ENTRY_TIMEOUT),
which is what makes `ls -l` of thousands of KV files fast. The store changes under
it: the syscalls append, truncate, fork and unlink, and one file's `cp` or rollback
changes which pages another file shares (its `st_blocks`). So every change is
reported back: the namespace's journal names the inodes whose attributes changed
and the names the syscalls removed, the pool names the pages whose refcounts
changed, and this module tells the kernel to drop what it holds about them.

Attribute invalidation takes no kernel lock a pending request could hold, so it runs
right away on the trio thread. Invalidating a name locks its directory, which a
request waiting for this very process may hold: that runs in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import pyfuse3
import trio

from symphony.fs.store import KVStore

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 60.0  # seconds; changes are invalidated as they happen, this is a backstop


class KernelCache:
    """The inodes and names whose kernel-cached entries a store change made stale."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self.live = False  # only while mounted: the notify calls need the session
        self._threads = 0  # name invalidations running in worker threads
        self._idle = trio.Event()
        self._idle.set()
        store.ns.journal.enabled = True
        store.pool.track_changes()

    def stale_inodes(self) -> set[int]:
        """Inodes changed since the last call, with every file holding a page whose
        refcount changed (its shared pages, so its st_blocks, may differ)."""
        journal = self.store.ns.journal
        inodes, journal.inodes = journal.inodes, set()
        pages = self.store.pool.take_changed()
        if pages:
            for file in self.store.all_files():
                if not pages.isdisjoint(file.pages):
                    inodes.add(file.inode)
        return inodes

    def invalidate_attributes(self) -> None:
        """Make the kernel ask again for the attributes of every inode that changed."""
        for inode in self.stale_inodes():
            if self.live:
                _quietly(pyfuse3.invalidate_inode, inode, True)

    def forget_removed(self) -> None:
        """The names removed so far went through the kernel (FUSE unlink, rename): it
        knows already."""
        self.store.ns.journal.removed.clear()

    async def invalidate(self) -> None:
        """After a syscall: attributes now, then the names it removed, so a `stat` the
        caller makes after the reply sees the change."""
        self.invalidate_attributes()
        journal = self.store.ns.journal
        removed, journal.removed = journal.removed, []
        if not removed or not self.live:
            return
        self._threads += 1
        self._idle = trio.Event()
        try:
            # shielded: a caller gone meanwhile must not leave a dead name in the kernel
            with trio.CancelScope(shield=True):
                for directory, name in removed:
                    if not self.live:  # closing: the session may be gone
                        break
                    await trio.to_thread.run_sync(
                        _quietly, pyfuse3.invalidate_entry, directory, os.fsencode(name)
                    )
        finally:
            self._threads -= 1
            if not self._threads:
                self._idle.set()

    async def close(self) -> None:
        """Before the session goes: no new notification, and the running ones done (a
        name invalidation waiting on a request nobody will answer now is given 2 s)."""
        self.live = False
        with trio.move_on_after(2):
            await self._idle.wait()


def _quietly(notify: Callable[..., None], *args: object) -> None:
    """Run a kernel notification. ENOENT (the kernel holds nothing about it) is the
    common answer; any other failure is logged, never raised: the change it was about
    has happened, and a notification must not fail the call or the step that made it."""
    try:
        notify(*args)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTCONN):
            log.warning("kernel cache notification %s%s failed: %s", notify.__name__, args, exc)
