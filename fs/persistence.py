"""KV files that survive a restart: `--state DIR` keeps the tree, each file and its pages.

    DIR/namespace.json      directories and file names with mode, owner and group; each
                            name points at a record
    DIR/records/ID.json     one file: domain, origin, token ids, and for each page its
                            key (which pages are one page in memory) and blob digest
    DIR/pages/DIGEST        one page's bytes (its filled slots, the rest zeros), once
    DIR/aside/              what a restore could not use, moved there, never deleted

A page that several files share in memory is stored once and restored once, every file
listing it getting a reference: a restore needs the pages the files held, not a copy per
file. A file is written through on fsync (only the pages not yet on disk), everything at
shutdown; a file's record, and the pages no record lists any more, go when it is
forgotten (its last name unlinked). Each write goes to a temporary name, is fsynced and
renamed into place, pages before the record naming them, records before the tree, so a
server killed at any moment leaves the last whole state: what was fsynced survives.

Threads: `prepare` reads the store, so it runs in the thread that changes the store;
`write` does the disk work and may run in a worker thread (the pages of what it writes
must stay alive and unwritten until it returns: `KVStore.hold`). `forget` never waits
for a write in flight: that write removes what was forgotten when it ends.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symphony.fs import kv_format
from symphony.fs.nodes import Directory, KVFile
from symphony.fs.state_files import (
    TMP_SUFFIX,
    PageStore,
    digest_of,
    fsync_dir,
    seal,
    write_atomically,
)
from symphony.fs.state_restore import Restore
from symphony.fs.store import KVStore

log = logging.getLogger(__name__)

VERSION = 2
NAMESPACE = "namespace.json"
PageEntry = tuple[str, str, int]  # (page key, blob digest, slots the blob holds)


@dataclass
class FileSave:
    """One file as `prepare` took it: what `write` puts on disk."""

    record_id: str
    pages: list[int]  # pool pages, alive until written
    keys: list[str]
    slots: list[int]  # slots each page's blob holds
    body: dict[str, Any]  # the record, but its pages


@dataclass
class TreeSave:
    """The namespace as `prepare` took it; a newer one is never overwritten by it."""

    seq: int
    data: bytes


class StateDir:
    """The on-disk copy of one store."""

    def __init__(self, path: str | os.PathLike[str], store: KVStore) -> None:
        self.path = Path(path)
        self.store = store
        self.records_dir = self.path / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.pages = PageStore(self.path / "pages", store.pool.bytes_per_page)
        # keys and record ids made by this run never collide with those of another
        self.epoch = secrets.token_hex(4)
        # taken briefly, by the store's thread and a writer
        self._meta = threading.Lock()
        self.record_ids: dict[int, str] = {}  # inode -> its record's id
        # an allocation of a pool page, (page, generation), is one page on disk; a
        # restored page keeps the key it was saved under
        self.page_keys: dict[tuple[int, int], str] = {}
        self._seq = 0
        self._dropped: list[str] = []  # records forgotten, not yet removed from disk
        self._gone: set[str] = set()  # every record forgotten: never written again
        # held while writing; what is on disk
        self._disk = threading.Lock()
        self.records: dict[str, list[PageEntry]] = {}  # record id -> its pages
        self.record_digests: dict[str, str] = {}  # record id -> digest of its bytes
        self.blob_refs: Counter[str] = Counter()  # page blob -> entries of records
        self.key_blobs: dict[str, tuple[str, int]] = {}  # key -> (digest, slots) last saved
        self._tree_seq = 0

    # the public calls -------------------------------------------------------------------

    def save_file(self, file: KVFile) -> None:
        """Write one file through, then the tree that names it (fsync)."""
        save = self.prepare(file)
        if save is not None:
            self.write([save], self.prepare_tree())

    def save_all(self) -> None:
        """Every file and the tree (at unmount and shutdown); what no file uses goes."""
        fills = self._page_fills(None)
        saves = [self._prepare(f, fills) for f in self.store.ns.files()]
        self.write(saves, self.prepare_tree(), collect=True)

    def save_namespace(self) -> None:
        """Write the tree; records of files that no longer exist are forgotten."""
        self.write([], self.prepare_tree())

    def forget(self, inode: int) -> None:
        """Remove the record of the file numbered `inode` and the page blobs no other
        record lists; call it when the file's last name goes (it is not restored then)."""
        if isinstance(self.store.ns.nodes.get(inode), KVFile):
            return  # still named
        with self._meta:
            self._forget(inode)
        self._remove_dropped()

    def restore(self) -> int:
        """Recreate the saved tree in the (empty) store; returns the files restored.

        A file whose record or pages are damaged, or that does not fit (the pool, the
        context), is moved into DIR/aside/ with one warning and the rest is restored; a
        damaged tree moves the whole state aside and the store starts empty.
        """
        return Restore(self).run()

    # taking what to save (the store's thread) -----------------------------------------

    def prepare(self, file: KVFile) -> FileSave | None:
        """What saving `file` writes, or None if it has no name (it does not survive)."""
        if not isinstance(self.store.ns.nodes.get(file.inode), KVFile):
            return None
        return self._prepare(file, self._page_fills(set(file.pages)))

    def _prepare(self, file: KVFile, fills: dict[int, int]) -> FileSave:
        pages, token_ids = list(file.pages), list(file.token_ids)
        with self._meta:
            record_id = self.record_ids.setdefault(file.inode, f"{self.epoch}-{file.inode}")
            keys = [self._key_of(page) for page in pages]
        ps = self.store.page_size
        slots = [
            max(kv_format.slots_filled(len(token_ids), ps, i), fills.get(page, 0))
            for i, page in enumerate(pages)
        ]
        body = {
            "version": VERSION,
            "model": self.store.fingerprint,
            "domain": file.domain,
            "origin": file.origin,
            "token_ids": token_ids,
        }
        return FileSave(record_id, pages, keys, slots, body)

    def prepare_tree(self) -> TreeSave:
        """The tree as it is: every directory, and each name of a file with a record."""
        ns = self.store.ns
        nodes = dict(ns.nodes)  # copies, not views: a writer's thread may run this
        with self._meta:
            for inode in [i for i in self.record_ids if not isinstance(nodes.get(i), KVFile)]:
                self._forget(inode)
            record_ids = dict(self.record_ids)
            self._seq += 1
            seq = self._seq
        dirs, files = [], []
        stack: list[tuple[str, Directory]] = [("", ns.root)]
        while stack:  # parents before their children
            base, directory = stack.pop()
            for name, child in dict(directory.children).items():
                path = f"{base}/{name}" if base else name
                node = nodes.get(child)
                if isinstance(node, Directory):
                    dirs.append({"path": path, **owner_of(node)})
                    stack.append((path, node))
                elif isinstance(node, KVFile) and child in record_ids:
                    files.append({"path": path, "record": record_ids[child], **owner_of(node)})
        tree = {
            "version": VERSION,
            "model": self.store.fingerprint,
            "geometry": kv_format.geometry(self.store.pool, self.store.fingerprint),
            "root": owner_of(ns.root),
            "dirs": dirs,
            "files": files,
        }
        return TreeSave(seq, seal(tree))

    def _forget(self, inode: int) -> None:
        record_id = self.record_ids.pop(inode, None)
        if record_id is not None:
            self._gone.add(record_id)
            self._dropped.append(record_id)

    def _key_of(self, page: int) -> str:
        generation = self.store.pool.generation[page]
        key = self.page_keys.get((page, generation))
        if key is None:
            if len(self.page_keys) > 2 * self.store.pool.num_pages:
                self._prune_keys()
            key = f"{self.epoch}.{page}.{generation}"
            self.page_keys[(page, generation)] = key
        return key

    def _prune_keys(self) -> None:
        """Drop keys of allocations that ended (the page was freed since)."""
        generation = self.store.pool.generation
        self.page_keys = {(p, g): k for (p, g), k in self.page_keys.items() if generation[p] == g}

    def _page_fills(self, pages: set[int] | None) -> dict[int, int]:
        """For each page (of `pages`, or all), the most slots any named file fills: a page
        shared by files cut at different lengths is saved once, with the longest's."""
        ps = self.store.page_size
        fills: dict[int, int] = {}
        for file in [n for n in list(self.store.ns.nodes.values()) if isinstance(n, KVFile)]:
            num_tokens = file.num_tokens
            for i, page in enumerate(list(file.pages)):
                if pages is None or page in pages:
                    # (never below 0, though the file changes in another thread)
                    slots = max(kv_format.slots_filled(num_tokens, ps, i), 0)
                    fills[page] = max(fills.get(page, 0), slots)
        return fills

    # writing (any thread) -------------------------------------------------------------

    def write(self, saves: list[FileSave], tree: TreeSave, collect: bool = False) -> None:
        """Put `saves` on disk, then `tree` unless a newer one is there already; with
        `collect`, remove what no record lists (left by a crash)."""
        with self._disk:
            for save in saves:
                if save.record_id not in self._gone:  # unlinked since it was prepared
                    self._write_record(save)
            fsync_dir(self.records_dir)
            if tree.seq > self._tree_seq:
                write_atomically(self.path / NAMESPACE, tree.data)
                fsync_dir(self.path)
                self._tree_seq = tree.seq
            self._remove_dropped_locked()
            if collect:
                self._collect_garbage()
        self._remove_dropped()  # forgotten while this write held the disk

    def _write_record(self, save: FileSave) -> None:
        entries: list[PageEntry] = []
        try:
            for page, key, slots in zip(save.pages, save.keys, save.slots, strict=True):
                entries.append(self._write_page(page, key, slots))
                self.blob_refs[entries[-1][1]] += 1
            fsync_dir(self.pages.path)
            data = seal({**save.body, "pages": entries})
            digest = digest_of(data)
            if self.record_digests.get(save.record_id) != digest:
                write_atomically(self.records_dir / f"{save.record_id}.json", data)
        except BaseException:
            self._drop_refs(entries, remove=False)  # blobs written are collected later
            raise
        self.record_digests[save.record_id] = digest
        self._drop_refs(self.records.get(save.record_id, []))
        self.records[save.record_id] = entries
        for key, blob, slots in entries:
            self.key_blobs[key] = (blob, slots)
        if len(self.key_blobs) > 4 * self.store.pool.num_pages:
            self.key_blobs = {k: v for k, v in self.key_blobs.items() if v[0] in self.blob_refs}

    def _write_page(self, page: int, key: str, slots: int) -> PageEntry:
        """The entry of pool page `page` holding `slots` filled slots; its blob is
        written unless already on disk."""
        pool = self.store.pool
        last = self.key_blobs.get(key)
        # saved before with more slots (a longer sharer has since gone): if those are
        # unchanged, keep that blob, so records saved before and after still agree that
        # this is one page
        if (
            last is not None
            and last[1] > slots
            and self.blob_refs[last[0]]
            and digest_of(pool.page_bytes(page, last[1])) == last[0]
        ):
            return (key, last[0], last[1])
        data = pool.page_bytes(page, slots)
        digest = digest_of(data)
        if not self.blob_refs[digest]:
            self.pages.write(digest, data)
        return (key, digest, slots)

    def _remove_dropped(self) -> None:
        """Remove forgotten records now, unless a write holds the disk (it will)."""
        while self._dropped and self._disk.acquire(blocking=False):
            try:
                self._remove_dropped_locked()
            finally:
                self._disk.release()

    def _remove_dropped_locked(self) -> None:
        while True:
            with self._meta:
                if not self._dropped:
                    return
                record_id = self._dropped.pop()
            (self.records_dir / f"{record_id}.json").unlink(missing_ok=True)
            self.record_digests.pop(record_id, None)
            self._drop_refs(self.records.pop(record_id, []))

    def _drop_refs(self, entries: list[PageEntry], remove: bool = True) -> None:
        for _, digest, _ in entries:
            self.blob_refs[digest] -= 1
            if self.blob_refs[digest] <= 0:
                del self.blob_refs[digest]
                if remove:
                    self.pages.remove(digest)

    def _collect_garbage(self) -> None:
        """Remove records and blobs nothing lists (left by a crash) and temporary files."""
        for path in self.records_dir.iterdir():
            record_id = path.name.removesuffix(".json")
            if path.name.endswith(TMP_SUFFIX) or record_id not in self.records:
                path.unlink(missing_ok=True)
        for name in self.pages.names():
            if name not in self.blob_refs:
                (self.pages.path / name).unlink(missing_ok=True)
        self.key_blobs = {k: v for k, v in self.key_blobs.items() if v[0] in self.blob_refs}


def owner_of(node: Any) -> dict[str, int]:
    return {"mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid}
