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
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from symphony.fs import kv_format
from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT, KVFile, Node
from symphony.fs.prefix_index import ROOT_HASH, page_hash
from symphony.fs.state_files import DIGEST_RE, TMP_SUFFIX, StateFileError, digest_of, unseal

if TYPE_CHECKING:
    from symphony.fs.persistence import PageEntry, StateDir

log = logging.getLogger(__name__)

ASIDE = "aside"
RECORD_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9]+")


class Restore:
    """One restore: the tree, then each file from its record and pages."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.store = state.store
        self.groups: dict[tuple[str, str], int] = {}  # (key, digest) -> its pool page
        self.keys_used: set[str] = set()
        self.bad_blobs: dict[str, str] = {}  # digest -> why it cannot be read
        self.restored = 0

    def run(self) -> int:
        path = self.state.path / "namespace.json"
        tree: dict[str, Any] | None = None
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            pass
        else:
            try:
                tree = self._read_tree(raw)
            except StateFileError as exc:
                self.set_aside_state(f"{path.name}: {exc}")
                return 0
        if tree is not None and tree["version"] == 1:
            from symphony.fs.state_v1 import restore_v1  # only for old state directories

            return restore_v1(self, tree)
        named: set[str] = set()
        if tree is not None:
            self.restore_dirs(tree)
            by_record: dict[str, list[dict[str, Any]]] = {}
            for f in tree["files"]:
                by_record.setdefault(f["record"], []).append(f)
            for record_id, names in by_record.items():
                self._restore_file(record_id, names)
            named = set(by_record)
        self._set_aside_unnamed(named)
        self.state.save_namespace()  # without what was set aside
        return self.restored

    # the tree -------------------------------------------------------------------------

    def _read_tree(self, raw: bytes) -> dict[str, Any]:
        try:
            old = json.loads(raw)
        except (ValueError, RecursionError):
            old = None
        if isinstance(old, dict) and old.get("version") == 1 and "checksum" not in old:
            tree = old  # written before trees were sealed
        else:
            tree = unseal(raw)
            if tree.get("version") != 2:
                raise StateFileError(f"unknown version {tree.get('version')!r}")
            geometry = kv_format.geometry(self.store.pool, self.store.fingerprint)
            if tree.get("geometry") != geometry:
                raise StateFileError(f"saved for {tree.get('geometry')}, this server is {geometry}")
        if tree.get("model") != self.store.fingerprint:
            raise StateFileError(f"saved for the model {tree.get('model')!r}")
        if not _tree_ok(tree):
            raise StateFileError("malformed")
        return tree

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
        path = self.state.records_dir / f"{record_id}.json"
        first = names[0]["path"]
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            log.info("state: %s was unlinked after the tree was last saved", first)
            return
        try:
            record = self._check_record(raw)
            entries: list[PageEntry] = [(k, d, s) for k, d, s in record["pages"]]
            pages = self._load_pages(entries)
        except StateFileError as exc:
            self.set_aside(first, str(exc), raw, path)
            return
        try:
            file = self.make_file(names, record["domain"])
        except StoreError as exc:
            self._give_back(pages)
            self.set_aside(first, str(exc), raw, path)
            return
        file.token_ids = list(record["token_ids"])
        file.pages = pages
        file.page_hashes = chain_hashes(file.token_ids, self.store, file.domain)
        file.origin = record["origin"]
        state = self.state
        state.record_ids[file.inode] = record_id
        state.records[record_id] = entries
        state.record_digests[record_id] = digest_of(raw)
        state.blob_refs.update(digest for _, digest, _ in entries)
        for key, digest, slots in entries:
            state.key_blobs.setdefault(key, (digest, slots))
        self.restored += 1

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

    def _check_record(self, raw: bytes) -> dict[str, Any]:
        record = unseal(raw)
        store = self.store
        if record.get("version") != 2 or record.get("model") != store.fingerprint:
            raise StateFileError("another version or model")
        ids, pages = record.get("token_ids"), record.get("pages")
        if not isinstance(record.get("domain"), str) or not isinstance(ids, list):
            raise StateFileError("malformed")
        if not isinstance(record.get("origin"), str) or not isinstance(pages, list):
            raise StateFileError("malformed")
        if any(not _is_int(t) or not 0 <= t < store.vocab_size for t in ids):
            raise StateFileError(f"a token id outside 0..{store.vocab_size - 1}")
        if len(ids) > store.max_tokens:
            raise StateFileError(f"does not fit: {len(ids)} tokens, context {store.max_tokens}")
        ps = store.page_size
        if len(pages) != -(-len(ids) // ps):
            raise StateFileError(f"{len(pages)} pages for {len(ids)} tokens")
        for i, entry in enumerate(pages):
            own = kv_format.slots_filled(len(ids), ps, i)
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], str)
                and DIGEST_RE.fullmatch(entry[1])
                and _is_int(entry[2])
                and own <= entry[2] <= ps
            ):
                raise StateFileError(f"page {i} malformed")
        return record

    def _load_pages(self, entries: list[PageEntry]) -> list[int]:
        """One pool page per stored page not restored yet, a reference per entry."""
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
                pool.write_page_bytes(page, self.state.pages.read(digest))
        except StateFileError as exc:
            self.bad_blobs[digest] = str(exc)
            pool.decref(fresh)
            raise
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
        for path in sorted(self.state.records_dir.iterdir()):
            record_id = path.name.removesuffix(".json")
            if path.name.endswith(TMP_SUFFIX) or record_id in named:
                continue
            self.set_aside(f"record {record_id}", "no name in the tree", path.read_bytes(), path)

    def set_aside(self, name: str, reason: str, raw: bytes, path: Path) -> None:
        """Move the file `path` (its name in the tree: `name`) into DIR/aside/, with the
        page blobs it lists (hard links: the state keeps its own)."""
        folder = self.aside_folder(name)
        os.replace(path, folder / path.name)
        for digest in sorted(set(DIGEST_RE.findall(raw.decode("latin-1")))):
            self.state.pages.link_into(digest, folder)
        (folder / "reason").write_text(f"{name}: {reason}\n")
        log.warning("state: %s set aside in %s: %s", name, folder, reason)

    def set_aside_state(self, reason: str) -> None:
        """Move the whole state into DIR/aside/ (a tree that cannot be read)."""
        folder = self.aside_folder("state")
        for part in ("namespace.json", "records", "pages", "files"):
            if (self.state.path / part).exists():
                os.replace(self.state.path / part, folder / part)
        self.state.records_dir.mkdir()
        self.state.pages.path.mkdir()
        log.warning("state: set aside in %s, starting empty: %s", folder, reason)

    def aside_folder(self, name: str) -> Path:
        base = self.state.path / ASIDE / quote(name, safe="")
        folder, n = base, 0
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}.{n}")
        folder.mkdir(parents=True)
        return folder


def chain_hashes(token_ids: Sequence[int], store: Any, domain: str) -> list[int]:
    """The prefix-hash chain of a file's full pages, as the store keeps it (the pages
    are not entered in the prefix index: they were read, not computed, here)."""
    ps, hashes, parent = store.page_size, [], ROOT_HASH
    for i in range(len(token_ids) // ps):
        parent = page_hash(parent, token_ids[i * ps : (i + 1) * ps], store.fingerprint, domain)
        hashes.append(parent)
    return hashes


def apply_owner(node: Node, saved: dict[str, Any]) -> None:
    node.mode = (node.mode & ~0o7777) | saved["mode"]
    node.uid, node.gid = saved["uid"], saved["gid"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _owner_ok(d: object) -> bool:
    return (
        isinstance(d, dict)
        and all(_is_int(d.get(k)) and d[k] >= 0 for k in ("mode", "uid", "gid"))
        and d["mode"] <= 0o7777
    )


def _tree_ok(tree: dict[str, Any]) -> bool:
    """Whether the tree has the shape `StateDir.save_namespace` writes."""
    dirs, files = tree.get("dirs"), tree.get("files")
    if not _owner_ok(tree.get("root")) or not isinstance(dirs, list) or not isinstance(files, list):
        return False
    if not all(_owner_ok(d) and isinstance(d.get("path"), str) for d in dirs):
        return False
    key = "record" if tree["version"] == 2 else "inode"
    return all(
        _owner_ok(f)
        and isinstance(f.get("path"), str)
        and (
            isinstance(f.get(key), str) and RECORD_ID_RE.fullmatch(f[key])
            if key == "record"
            else _is_int(f.get(key))
        )
        for f in files
    )
