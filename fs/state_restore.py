"""Restoring a state directory (fs/persistence.py) into the empty store at start.

Each stored page is read once, checked against its digest and put in one pool page;
every file that lists it gets a reference, so files that shared a page in memory share
it again and nothing else is shared (each file keeps its own domain). What cannot be
used is moved into DIR/aside/ with one warning, never deleted, and the server starts
with the rest: a damaged or truncated record or page, a file that no longer fits (the
pool, the context), a damaged tree (then the whole state, and the store starts empty).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar, parse_record
from symphony.fs.nodes import ROOT, KVFile, Node
from symphony.fs.prefix_index import ROOT_HASH, page_hash
from symphony.fs.state_checks import read_record, read_tree
from symphony.fs.state_disk import NAMESPACE, PageEntry
from symphony.fs.state_files import DIGEST_RE, TMP_SUFFIX, StateFileError
from symphony.fs.store import KVStore

if TYPE_CHECKING:
    from symphony.fs.persistence import StateDir

log = logging.getLogger(__name__)

ASIDE = "aside"


class Restore:
    """One restore: the tree, then each file from its record and pages."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.store = state.store
        self.disk = state.disk
        self.groups: dict[tuple[str, str], int] = {}  # (key, digest) -> its pool page
        self.keys_used: set[str] = set()
        self.bad_blobs: dict[str, str] = {}  # digest -> why it cannot be read
        self.restored = 0

    def run(self) -> int:
        path = self.state.path / NAMESPACE
        tree: dict[str, Any] | None = None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            pass
        else:
            try:
                tree = read_tree(raw, self.store)
            except StateFileError as exc:
                self.set_aside_state(f"{path.name}: {exc}")
                return 0
        if tree is not None and tree["version"] == 1:
            from symphony.fs.state_v1 import restore_v1  # only for old state directories

            return restore_v1(self, tree)
        if tree is None:  # nothing saved yet (a first start writes no tree)
            self._set_aside_unnamed(set())
            return 0
        self.restore_dirs(tree)
        by_record: dict[str, list[dict[str, Any]]] = {}
        for f in tree["files"]:
            by_record.setdefault(f["record"], []).append(f)
        for record_id, names in by_record.items():
            self._restore_file(record_id, names)
        self._set_aside_unnamed(set(by_record))
        self.state.save_namespace()  # without what was set aside
        return self.restored

    # the tree -------------------------------------------------------------------------

    def restore_dirs(self, tree: dict[str, Any]) -> None:
        ns = self.store.ns
        apply_owner(ns.root, tree["root"])
        for d in tree["dirs"]:
            try:
                apply_owner(ns.mkdir(d["path"], ROOT, d["mode"]), d)
            except StoreError as exc:
                log.warning("state: directory %s not restored: %s", d["path"], exc)

    # files ----------------------------------------------------------------------------

    def _restore_file(self, record_id: str, names: list[dict[str, Any]]) -> None:
        path = self.disk.records_dir / f"{record_id}.json"
        first = names[0]["path"]
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            log.info("state: %s was unlinked after the tree was last saved", first)
            return
        except OSError as exc:
            log.warning("state: %s not restored: %s", first, exc)
            return
        try:
            record = read_record(raw, self.store)
            entries: list[PageEntry] = [(k, d, s) for k, d, s in record["pages"]]
            pages = self._load_pages(entries, names[0]["uid"])
        except StateFileError as exc:
            self.set_aside(first, str(exc), raw, path)
            return
        try:
            grammar = self._grammar(record)
            file = self.make_file(names, record["domain"])
        except StoreError as exc:
            self._give_back(pages)
            self.set_aside(first, str(exc), raw, path)
            return
        file.token_ids = list(record["token_ids"])
        positions = record.get("positions")
        if positions is not None and positions != list(range(len(positions))):
            file.positions = list(positions)
        file.custom_from = record.get("custom_from")
        file.masks = {index: list(ranges) for index, ranges in record.get("masks", [])}
        file.pages = pages
        file.page_hashes = chain_hashes(file.token_ids, self.store, file.domain)
        file.origin = record["origin"]
        file.grammar = grammar
        self.state.record_ids[file.inode] = record_id
        self.disk.adopt(record_id, entries, raw)
        self.restored += 1

    def _grammar(self, record: dict[str, Any]) -> Grammar | None:
        """The file's grammar, fed its tokens again from where it starts."""
        if "grammar" not in record:
            return None
        grammars = self.store.grammars
        if grammars is None:
            raise StoreError(errno.ENOTSUP, "a grammar, and this server has no compiler")
        tokens = record["token_ids"]
        spec, start = parse_record(record["grammar"], len(tokens))
        return grammars.replay(spec, start, tokens[start:])

    def make_file(self, names: list[dict[str, Any]], domain: str) -> KVFile:
        """The file under its first name, with its owner and mode, and its other names."""
        ns = self.store.ns
        file = ns.create_file(names[0]["path"], ROOT, names[0]["mode"], domain)
        apply_owner(file, names[0])
        for other in names[1:]:
            try:
                ns.link_node(file, other["path"], ROOT)
            except StoreError as exc:
                log.warning("state: the name %s not restored: %s", other["path"], exc)
        return file

    def _load_pages(self, entries: list[PageEntry], uid: int) -> list[int]:
        """One pool page per stored page not restored yet, a reference per entry; new
        pages are charged to `uid` (never refused for its share: a restart comes up as
        it went down)."""
        pool = self.store.pool
        new = list(dict.fromkeys((k, d) for k, d, _ in entries if (k, d) not in self.groups))
        for _, digest in new:
            if digest in self.bad_blobs:
                raise StateFileError(self.bad_blobs[digest])
        try:
            fresh = self.store.allocate(len(new))
        except StoreError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise StateFileError(
                f"does not fit: needs {len(new)} more pages, {pool.num_free} free"
            ) from None
        try:
            for (_, digest), page in zip(new, fresh, strict=True):
                pool.write_page_bytes(page, self.disk.pages.read(digest))
        except StateFileError as exc:
            self.bad_blobs[digest] = str(exc)
            pool.decref(fresh)
            raise
        self.store.charges.charge(self.store.charges.user(uid), fresh)
        for (key, digest), page in zip(new, fresh, strict=True):
            self.groups[(key, digest)] = page
            if key in self.keys_used:  # the page was changed in place: another allocation
                key = f"{self.state.epoch}.{page}.{pool.generation[page]}"
            self.keys_used.add(key)
            self.state.page_keys[(page, pool.generation[page])] = key
        unclaimed = set(new)  # the allocation's reference goes to the first entry
        pages = []
        for key, digest, _ in entries:
            page = self.groups[(key, digest)]
            if (key, digest) in unclaimed:
                unclaimed.discard((key, digest))
            else:
                pool.incref([page])
            pages.append(page)
        return pages

    def _give_back(self, pages: list[int]) -> None:
        freed = set(self.store.pool.decref(pages))
        self.groups = {g: p for g, p in self.groups.items() if p not in freed}

    # setting aside ----------------------------------------------------------------------

    def _set_aside_unnamed(self, named: set[str]) -> None:
        """Records no name points at (a crash while a new file was first written)."""
        for path in sorted(self.disk.records_dir.iterdir()):
            record_id = path.name.removesuffix(".json")
            if path.name.endswith(TMP_SUFFIX) or record_id in named:
                continue
            try:
                raw = path.read_bytes()
            except OSError as exc:
                log.warning("state: %s left in place: %s", path, exc)
                continue
            self.set_aside(f"record {record_id}", "no name in the tree", raw, path)

    def set_aside(self, name: str, reason: str, raw: bytes, path: Path) -> None:
        """Move the file `path` (its name in the tree: `name`) into DIR/aside/, with the
        page blobs it lists (hard links: the state keeps its own)."""
        try:
            folder = self.aside_folder(name)
            os.replace(path, folder / path.name)
            for digest in sorted(set(DIGEST_RE.findall(raw.decode("latin-1")))):
                self.disk.pages.link_into(digest, folder)
            (folder / "reason").write_text(f"{name}: {reason}\n")
        except OSError as exc:  # the server starts all the same
            log.warning("state: %s not restored (%s) nor set aside: %s", name, reason, exc)
            return
        log.warning("state: %s set aside in %s: %s", name, folder, reason)

    def set_aside_state(self, reason: str) -> None:
        """Move the whole state into DIR/aside/ (a tree that cannot be read)."""
        folder = self.aside_folder("state")
        for part in ("namespace.json", "records", "pages", "files"):
            if (self.state.path / part).exists():
                os.replace(self.state.path / part, folder / part)
        self.disk.records_dir.mkdir()
        self.disk.pages.path.mkdir()
        log.warning("state: set aside in %s, starting empty: %s", folder, reason)

    def aside_folder(self, name: str) -> Path:
        base = self.state.path / ASIDE / quote(name, safe="")[:200]  # a name is 255 at most
        folder, n = base, 0
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}.{n}")
        folder.mkdir(parents=True)
        return folder


def chain_hashes(token_ids: Sequence[int], store: KVStore, domain: str) -> list[int]:
    """The prefix-hash chain of a file's full pages, as the store keeps it. No page is
    entered in the prefix index: they were read, not computed, here; nor could those
    from a file's `custom_from` on ever be (their K/V are not what the tokens alone give,
    and the hashes cover only the tokens)."""
    ps, hashes, parent = store.page_size, [], ROOT_HASH
    for i in range(len(token_ids) // ps):
        parent = page_hash(parent, token_ids[i * ps : (i + 1) * ps], store.fingerprint, domain)
        hashes.append(parent)
    return hashes


def apply_owner(node: Node, saved: dict[str, Any]) -> None:
    node.mode = (node.mode & ~0o7777) | saved["mode"]
    node.uid, node.gid = saved["uid"], saved["gid"]
