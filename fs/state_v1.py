"""Reading a state directory of the first format: namespace.json version 1, and each
file's bytes in the KV format in DIR/files/INODE.kv.

Each file is imported as `cp` into the mount would (pages shared by content within its
own domain), the state is written again in the current format, and the old files are
moved into DIR/aside/, not deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from symphony.fs.errors import StoreError
from symphony.fs.nodes import ROOT, imported_by
from symphony.fs.state_files import StateFileError

if TYPE_CHECKING:
    from symphony.fs.state_restore import Restore

log = logging.getLogger(__name__)


def restore_v1(restore: Restore, tree: dict[str, Any]) -> int:
    """Restore the version-1 `tree` (checked by the caller); returns the files restored."""
    state, store = restore.state, restore.store
    files_dir = state.path / "files"
    restore.restore_dirs(tree)
    by_inode: dict[int, list[dict[str, Any]]] = {}
    for f in tree["files"]:
        by_inode.setdefault(f["inode"], []).append(f)
    for inode, names in by_inode.items():
        path = files_dir / f"{inode}.kv"
        first, domain = names[0]["path"], names[0].get("domain")
        if not path.exists():
            log.warning("state: %s not restored: %s is missing", first, path)
            continue
        importer = store.importer(ROOT, domain=domain if isinstance(domain, str) else "")
        try:
            if not isinstance(domain, str):
                raise StateFileError("malformed")
            importer.write(0, path.read_bytes())
            if not importer.complete():
                raise StateFileError("truncated")
            file = restore.make_file(names, domain)
        except (StoreError, StateFileError) as exc:
            importer.abort()
            restore.set_aside(first, str(exc), b"", path)
            continue
        store.commit_import(file, importer)
        # the old format kept no origin: whether these K/V were computed here is unknown,
        # so they count as imported by the owner (never indexed)
        file.origin = imported_by(file.uid)
        restore.restored += 1
    aside = restore.aside_folder("v1-state")
    shutil.copy2(state.path / "namespace.json", aside / "namespace.json")
    state.save_all()  # the current format, before the old files move
    if files_dir.exists():
        os.replace(files_dir, aside / "files")
    log.info(
        "state: %d files read from the old format; its files are kept in %s",
        restore.restored,
        aside,
    )
    return restore.restored
