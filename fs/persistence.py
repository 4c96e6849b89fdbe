"""KV files that survive a restart: `--state DIR` keeps each file's bytes and the tree.

    DIR/namespace.json   directories and file names, with mode, owner, group, domain
    DIR/files/N.kv       one file's bytes in the KV format (fs/kv_format.py)

A file is written through on fsync; everything at shutdown. Every write goes to a
temporary name and is renamed into place, so a server killed at any moment leaves the
last whole state: what was fsynced survives, what was not is lost.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from symphony.fs import kv_format
from symphony.fs.errors import StoreError
from symphony.fs.namespace import ROOT_INODE
from symphony.fs.nodes import ROOT, Directory, KVFile
from symphony.fs.store import KVStore

log = logging.getLogger(__name__)

RESTORE_DOMAIN = "restore"  # content sharing among restored files only


def _write_atomically(path: Path, chunks: list[bytes] | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    """The on-disk copy of one store."""

    def __init__(self, path: str | os.PathLike[str], store: KVStore) -> None:
        self.path = Path(path)
        self.store = store
        (self.path / "files").mkdir(parents=True, exist_ok=True)
        self._saved: set[int] = set()  # inodes whose bytes are on disk

    def _file_path(self, inode: int) -> Path:
        return self.path / "files" / f"{inode}.kv"

    def _write_file(self, file: KVFile) -> None:
        pool = self.store.pool
        lay = kv_format.layout(pool, self.store.fingerprint, file.token_ids, len(file.pages))
        ps = pool.page_size
        chunks = [lay.head]
        for i, page in enumerate(file.pages):
            chunks.append(pool.page_bytes(page, kv_format.slots_filled(lay.num_tokens, ps, i)))
        _write_atomically(self._file_path(file.inode), chunks)
        self._saved.add(file.inode)

    def save_file(self, file: KVFile) -> None:
        """Write one file's bytes through, then the tree that names it (fsync)."""
        self._write_file(file)
        self.save_namespace()

    def save_namespace(self) -> None:
        ns = self.store.ns
        dirs, files = [], []
        for inode, node in ns.nodes.items():
            if isinstance(node, Directory) and inode != ROOT_INODE:
                dirs.append({"path": ns.path_of(inode), **_owner(node)})
        for node in ns.nodes.values():
            if isinstance(node, Directory):
                base = ns.path_of(node.inode)
                for name, child in node.children.items():
                    if child in self._saved and isinstance(ns.nodes[child], KVFile):
                        path = f"{base}/{name}" if base else name
                        kv = ns.nodes[child]
                        assert isinstance(kv, KVFile)
                        entry = {"path": path, "inode": child, "domain": kv.domain}
                        files.append({**entry, **_owner(kv)})
        dirs.sort(key=lambda d: d["path"].count("/"))
        state = {
            "version": 1,
            "model": self.store.fingerprint,
            "root": _owner(ns.root),
            "dirs": dirs,
            "files": files,
        }
        _write_atomically(self.path / "namespace.json", json.dumps(state, indent=1).encode())

    def save_all(self) -> None:
        """Every file's bytes and the tree (at unmount and shutdown); stale files go."""
        live = {f.inode for f in self.store.ns.files()}
        for file in self.store.ns.files():
            self._write_file(file)
        self.save_namespace()
        for path in (self.path / "files").glob("*.kv"):
            if int(path.stem) not in live:
                path.unlink()
        self._saved &= live

    def restore(self) -> int:
        """Recreate the saved tree in the (empty) store; returns the files restored."""
        try:
            state = json.loads((self.path / "namespace.json").read_text())
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise StoreError(
                errno.EINVAL, f"damaged {self.path / 'namespace.json'}: {exc}"
            ) from None
        if state.get("model") != self.store.fingerprint:
            raise StoreError(errno.EINVAL, f"the state in {self.path} belongs to another model")
        ns = self.store.ns
        _apply_owner(ns.root, state["root"])
        for d in state["dirs"]:
            _apply_owner(ns.mkdir(d["path"], ROOT, d["mode"]), d)
        by_inode: dict[int, KVFile] = {}
        first_path: dict[int, str] = {}
        old_to_new: dict[int, int] = {}
        for f in state["files"]:
            if f["inode"] in by_inode:  # another name of a file already restored
                ns.link(first_path[f["inode"]], f["path"], ROOT)
                continue
            first_path[f["inode"]] = f["path"]
            file = ns.create_file(f["path"], ROOT, f["mode"], f["domain"])
            _apply_owner(file, f)
            # one domain for the whole restore: files that shared pages share them again
            importer = self.store.importer(ROOT, domain=RESTORE_DOMAIN)
            data = self._file_path(f["inode"]).read_bytes()
            importer.write(0, data)
            if not importer.complete():
                importer.abort()
                raise StoreError(errno.EINVAL, f"damaged state file for {f['path']}")
            self.store.commit_import(file, importer)
            by_inode[f["inode"]] = file
            old_to_new[f["inode"]] = file.inode
        # the files are saved under their new inode numbers from now on
        for old, new in old_to_new.items():
            if old != new:
                os.replace(self._file_path(old), self._file_path(new).with_suffix(".moving"))
        for path in (self.path / "files").glob("*.moving"):
            path.rename(path.with_suffix(".kv"))
        self._saved = set(old_to_new.values())
        self.save_namespace()
        return len(by_inode)


def _owner(node: Any) -> dict[str, int]:
    return {"mode": stat.S_IMODE(node.mode), "uid": node.uid, "gid": node.gid}


def _apply_owner(node: Any, saved: dict[str, Any]) -> None:
    node.mode = (node.mode & ~0o7777) | saved["mode"]
    node.uid, node.gid = saved["uid"], saved["gid"]
