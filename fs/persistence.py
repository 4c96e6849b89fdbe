"""KV files that survive a restart: `--state DIR` keeps the tree, each file and its pages.

    DIR/namespace.json      directories and file names with mode, owner and group; each
                            name points at a record
    DIR/records/ID.json     one file: domain, origin, token ids, their positions and the
                            first custom token (each only where set), and for each page
                            its key (which pages are one page in memory) and blob digest
    DIR/pages/DIGEST        one page's bytes (its filled slots, the rest zeros), once
    DIR/aside/              what a restore could not use, moved there, never deleted

A page that several files share in memory is stored once and restored once, every file
listing it getting a reference: a restore needs the pages the files held, not a copy per
file. A file is written through on fsync (only the pages not yet on disk), everything at
shutdown; a file's record, and the pages no record lists any more, go when it is
forgotten (its last name unlinked). Each write goes to a temporary name, is fsynced and
renamed into place, pages before the record naming them, records before the tree, so a
server killed at any moment leaves the last whole state: what was fsynced survives.

Threads: `prepare` and `prepare_tree` read the store, so they run in the thread that
changes it; `write` does the disk work and may run in a worker thread (the pages of what
it writes must stay alive and unwritten until it returns: `KVStore.hold`). One write
runs at a time; `forget` never waits for it: that write removes what was forgotten when
it ends. `save_file`, `save_namespace` and `save_all` do both halves in the caller's
thread.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Any

from symphony.fs import kv_format
from symphony.fs.nodes import Directory, KVFile
from symphony.fs.state_checks import VERSION
from symphony.fs.state_disk import DiskState, FileSave, TreeSave
from symphony.fs.state_files import seal
from symphony.fs.state_restore import Restore
from symphony.fs.store import KVStore


class StateDir:
    """The on-disk copy of one store."""

    def __init__(self, path: str | os.PathLike[str], store: KVStore) -> None:
        self.path = Path(path)
        self.store = store
        self.disk = DiskState(self.path, store.pool)
        # keys and record ids made by this run never collide with those of another
        self.epoch = secrets.token_hex(4)
        self._meta = threading.Lock()  # taken briefly, by the store's thread or a writer
        self.record_ids: dict[int, str] = {}  # inode -> its record's id
        # an allocation of a pool page, (page, generation), is one page on disk; a
        # restored page keeps the key it was saved under
        self.page_keys: dict[tuple[int, int], str] = {}
        self._seq = 0
        # namespace.json as last made, with what it was made from: (tree version, record
        # version); fsyncs in a loop then cost no walk of the whole tree
        self._records_version = 0
        self._tree_memo: tuple[tuple[int, int], bytes] | None = None

    # the public calls -------------------------------------------------------------------

    def save_file(self, file: KVFile) -> None:
        """Write one file through, then the tree that names it (fsync)."""
        save = self.prepare(file)
        if save is not None:
            self.disk.write([save], self.prepare_tree())

    def write(self, save: FileSave, tree: TreeSave) -> None:
        """Put what `prepare` and `prepare_tree` took on disk; any thread may call it
        while the pages of `save` are held (`KVStore.hold`)."""
        self.disk.write([save], tree)

    def save_all(self) -> None:
        """Every file and the tree (at shutdown); what no file uses goes."""
        self.write_all(*self.prepare_all())

    def prepare_all(self) -> tuple[list[FileSave], TreeSave]:
        """What save_all writes, taken in the store's thread."""
        fills = self._page_fills(None)
        return [self._prepare(f, fills) for f in self.store.ns.files()], self.prepare_tree()

    def write_all(self, saves: list[FileSave], tree: TreeSave) -> None:
        """Put what prepare_all took on disk (any thread, the pages of `saves` held)."""
        self.disk.write(saves, tree, collect=True)

    def save_namespace(self) -> None:
        """Write the tree; records of files that no longer exist are forgotten."""
        self.disk.write([], self.prepare_tree())

    def forget(self, inode: int) -> None:
        """Remove the record of the file numbered `inode` and the page blobs no other
        record lists; call it when the file's last name goes (it is not restored then)."""
        if isinstance(self.store.ns.nodes.get(inode), KVFile):
            return  # still named
        with self._meta:
            record_id = self.record_ids.pop(inode, None)
            self._records_version += record_id is not None
        if record_id is not None:
            self.disk.drop(record_id)

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
            self._records_version += file.inode not in self.record_ids
            record_id = self.record_ids.setdefault(file.inode, f"{self.epoch}-{file.inode}")
            keys = [self._key_of(page) for page in pages]
        ps = self.store.page_size
        slots = [
            max(kv_format.slots_filled(len(token_ids), ps, i), fills.get(page, 0))
            for i, page in enumerate(pages)
        ]
        body: dict[str, Any] = {
            "version": VERSION,
            "model": self.store.fingerprint,
            "domain": file.domain,
            "origin": file.origin,
            "token_ids": token_ids,
        }
        # absent for a plain file, so its record reads as before positions were kept
        if file.positions is not None:
            body["positions"] = list(file.positions)
        if file.custom_from is not None:
            body["custom_from"] = file.custom_from
        if file.masks:  # JSON keys are strings: a list of [index, ranges] pairs
            body["masks"] = [[i, list(r)] for i, r in sorted(file.masks.items())]
        if file.grammar is not None:  # restored by feeding it the tokens from its start
            body["grammar"] = file.grammar.record
        return FileSave(record_id, pages, keys, slots, body)

    def prepare_tree(self) -> TreeSave:
        """The tree as it is: every directory, and each name of a file with a record."""
        ns = self.store.ns
        nodes = dict(ns.nodes)  # copies, not views: a writer's thread may run this
        with self._meta:
            gone = [i for i in self.record_ids if not isinstance(nodes.get(i), KVFile)]
            dropped = [self.record_ids.pop(inode) for inode in gone]
            self._records_version += bool(dropped)
            record_ids = dict(self.record_ids)
            self._seq += 1
            seq = self._seq
            made_from = (ns.journal.tree_version, self._records_version)
            memo = self._tree_memo
        for record_id in dropped:
            self.disk.drop(record_id)
        if memo is not None and memo[0] == made_from:
            return TreeSave(seq, memo[1])
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
        data = seal(tree)
        with self._meta:
            self._tree_memo = (made_from, data)
        return TreeSave(seq, data)

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


def owner_of(node: Any) -> dict[str, int]:
    return {"mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid}
