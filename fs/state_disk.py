"""What a state directory holds on disk, and the writes that change it (any thread).

Records list page blobs; a blob is written once, the first time a record lists it, and
removed when the last record listing it goes. One write runs at a time; a record
dropped meanwhile (its file unlinked) is removed when that write ends, so dropping never
waits for the disk.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from symphony.engine.page_pool import PagePool
from symphony.fs.state_files import (
    TMP_SUFFIX,
    PageStore,
    digest_of,
    fsync_dir,
    seal,
    write_atomically,
)

NAMESPACE = "namespace.json"
GONE_KEPT = 4096
PageEntry = tuple[str, str, int]  # (page key, blob digest, slots the blob holds)


@dataclass
class FileSave:
    """One file as it was prepared: what `DiskState.write` puts on disk."""

    record_id: str
    pages: list[int]  # pool pages, alive and unwritten until written
    keys: list[str]  # which pages are one page in memory
    slots: list[int]  # slots each page's blob holds
    body: dict[str, Any]  # the record, but its pages


@dataclass
class TreeSave:
    """The namespace as it was prepared; never written over a newer one."""

    seq: int
    data: bytes


class DiskState:
    """Records and page blobs on disk, with the references between them."""

    def __init__(self, path: Path, pool: PagePool) -> None:
        self.path = path
        self.pool = pool
        self.records_dir = path / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.pages = PageStore(path / "pages", pool.bytes_per_page)
        self.lock = threading.Lock()  # held by the write in progress
        self.records: dict[str, list[PageEntry]] = {}  # record id -> its pages
        self.record_digests: dict[str, str] = {}  # record id -> digest of its bytes
        self.blob_refs: Counter[str] = Counter()  # page blob -> entries of records
        self.key_blobs: dict[str, tuple[str, int]] = {}  # key -> (digest, slots) last saved
        self._tree_seq = 0
        self._queue = threading.Lock()  # guards the two below, briefly
        self._dropped: list[str] = []  # records to remove
        # records dropped lately: a save of one prepared before is not written (a save
        # waits for one write at most, so the last few thousand are plenty)
        self._gone: dict[str, None] = {}

    def adopt(self, record_id: str, entries: list[PageEntry], raw: bytes) -> None:
        """Take the record `record_id`, found on disk as `raw`, as written (restore)."""
        self.records[record_id] = entries
        self.record_digests[record_id] = digest_of(raw)
        self.blob_refs.update(digest for _, digest, _ in entries)
        for key, digest, slots in entries:
            self.key_blobs.setdefault(key, (digest, slots))

    def drop(self, record_id: str) -> None:
        """Remove the record and the blobs nothing else lists, now or when the write in
        progress ends; a save of it prepared before is not written."""
        with self._queue:
            self._gone[record_id] = None
            if len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]
            self._dropped.append(record_id)
        self._remove_dropped()

    def write(self, saves: list[FileSave], tree: TreeSave, collect: bool = False) -> None:
        """Put `saves` on disk, then `tree` unless a newer one is there already; with
        `collect`, remove what no record lists (left by a crash)."""
        with self.lock:
            for save in saves:
                with self._queue:
                    gone = save.record_id in self._gone  # unlinked since it was prepared
                if not gone:
                    self._write_record(save)
            if saves:
                fsync_dir(self.records_dir)
            if tree.seq > self._tree_seq:
                write_atomically(self.path / NAMESPACE, tree.data)
                fsync_dir(self.path)
                self._tree_seq = tree.seq
            self._remove_dropped_locked()
            if collect:
                self._collect_garbage()
        self._remove_dropped()  # dropped while this write held the disk

    def _write_record(self, save: FileSave) -> None:
        entries: list[PageEntry] = []
        # this record's own references, old and new: not another file's
        mine = Counter(digest for _, digest, _ in self.records.get(save.record_id, []))
        try:
            for page, key, slots in zip(save.pages, save.keys, save.slots, strict=True):
                entries.append(self._write_page(page, key, slots, mine))
                self.blob_refs[entries[-1][1]] += 1
                mine[entries[-1][1]] += 1
            if self.pages.unsynced:
                fsync_dir(self.pages.path)
                self.pages.unsynced = False
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
        if len(self.key_blobs) > 4 * self.pool.num_pages:
            self.key_blobs = {k: v for k, v in self.key_blobs.items() if v[0] in self.blob_refs}

    def _write_page(self, page: int, key: str, slots: int, mine: Counter[str]) -> PageEntry:
        """The entry of pool page `page` holding `slots` filled slots; its blob is
        written unless already on disk."""
        last = self.key_blobs.get(key)
        # saved before with more slots, by a longer sharer that has since been cut: while
        # another record still lists that blob, and those slots are unchanged, keep it,
        # so that both records still say this is one page. Once none does, the slots
        # past every file's end leave the disk
        if (
            last is not None
            and last[1] > slots
            and self.blob_refs[last[0]] > mine[last[0]]
            and digest_of(self.pool.page_bytes(page, last[1])) == last[0]
        ):
            return (key, last[0], last[1])
        data = self.pool.page_bytes(page, slots)
        digest = digest_of(data)
        if not self.blob_refs[digest]:
            self.pages.write(digest, data)
        return (key, digest, slots)

    def _remove_dropped(self) -> None:
        """Remove dropped records now, unless a write holds the disk (it will)."""
        while self._dropped and self.lock.acquire(blocking=False):
            try:
                self._remove_dropped_locked()
            finally:
                self.lock.release()

    def _remove_dropped_locked(self) -> None:
        while True:
            with self._queue:
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
