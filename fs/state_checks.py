"""Checks of what a restore reads: a tree or a record has the shape it was written with
and fits this server (model, geometry, vocabulary, context), or it is not used."""

from __future__ import annotations

import json
import re
from typing import Any

from symphony.engine.batch import ranges_problem
from symphony.fs import kv_format
from symphony.fs.state_files import DIGEST_RE, StateFileError, unseal
from symphony.fs.store import KVStore

VERSION = 2
RECORD_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9]+")


def read_tree(raw: bytes, store: KVStore) -> dict[str, Any]:
    """The tree in namespace.json (version 2, or 1 of the first format).

    Raises:
        StateFileError: damaged, malformed, or saved for another model or geometry.
    """
    try:
        old = json_map(raw)
    except StateFileError:
        old = None
    if old is not None and old.get("version") == 1 and "checksum" not in old:
        tree = old  # written before trees were sealed
    else:
        tree = unseal(raw)
        if tree.get("version") != VERSION:
            raise StateFileError(f"unknown version {tree.get('version')!r}")
        geometry = kv_format.geometry(store.pool, store.fingerprint)
        saved = tree.get("geometry")
        if isinstance(saved, dict):
            # trees saved before version 2 of the KV format kept its version here
            saved = {k: v for k, v in saved.items() if k != "version"}
        if saved != geometry:
            raise StateFileError(f"saved for {saved}, this server is {geometry}")
    if tree.get("model") != store.fingerprint:
        raise StateFileError(f"saved for the model {tree.get('model')!r}")
    if not _tree_ok(tree):
        raise StateFileError("malformed")
    return tree


def json_map(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise StateFileError("not JSON") from None
    if not isinstance(value, dict):
        raise StateFileError("not a map")
    return value


def read_record(raw: bytes, store: KVStore) -> dict[str, Any]:
    """One file's record, checked against this server.

    Raises:
        StateFileError: damaged or malformed, or it does not fit (vocabulary, context).
    """
    record = unseal(raw)
    if record.get("version") != VERSION or record.get("model") != store.fingerprint:
        raise StateFileError("another version or model")
    ids, pages = record.get("token_ids"), record.get("pages")
    if not isinstance(record.get("domain"), str) or not isinstance(record.get("origin"), str):
        raise StateFileError("malformed")
    if not isinstance(ids, list) or not isinstance(pages, list):
        raise StateFileError("malformed")
    if any(not is_int(t) or not 0 <= t < store.vocab_size for t in ids):
        raise StateFileError(f"a token id outside 0..{store.vocab_size - 1}")
    if len(ids) > store.max_tokens:
        raise StateFileError(f"does not fit: {len(ids)} tokens, context {store.max_tokens}")
    _check_positions(record, len(ids), store.max_tokens)
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
            and is_int(entry[2])
            and own <= entry[2] <= ps
        ):
            raise StateFileError(f"page {i} malformed")
    return record


def _check_positions(record: dict[str, Any], num_tokens: int, max_tokens: int) -> None:
    """`positions` (absent or null: token i at position i) is one position in the
    context per token; `custom_from` (absent or null: none) the index of a token."""
    positions, custom_from = record.get("positions"), record.get("custom_from")
    if positions is not None:
        if not isinstance(positions, list) or len(positions) != num_tokens:
            raise StateFileError("positions malformed")
        if any(not is_int(p) or not 0 <= p < max_tokens for p in positions):
            raise StateFileError(f"does not fit: a position outside 0..{max_tokens - 1}")
    if custom_from is not None and not (is_int(custom_from) and 0 <= custom_from < num_tokens):
        raise StateFileError("custom_from malformed")
    masks = record.get("masks", [])
    if not isinstance(masks, list):
        raise StateFileError("masks malformed")
    for entry in masks:  # [index, [start, end, ...]]: sorted ranges ending with the token
        if not (isinstance(entry, list) and len(entry) == 2 and is_int(entry[0])):
            raise StateFileError("masks malformed")
        index, ranges = entry
        if not 0 <= index < num_tokens or not _ranges_ok(ranges, index):
            raise StateFileError(f"the mask of token {index} malformed")


def _ranges_ok(ranges: object, index: int) -> bool:
    if not isinstance(ranges, list) or not all(is_int(v) for v in ranges):
        return False
    return ranges_problem(ranges, index) is None


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _owner_ok(d: object) -> bool:
    return (
        isinstance(d, dict)
        and all(is_int(d.get(k)) and d[k] >= 0 for k in ("mode", "uid", "gid"))
        and d["mode"] <= 0o7777
    )


def _file_ok(f: object, version: int) -> bool:
    if not _owner_ok(f) or not isinstance(f, dict) or not isinstance(f.get("path"), str):
        return False
    if version == 1:
        return is_int(f.get("inode"))
    record = f.get("record")
    return isinstance(record, str) and RECORD_ID_RE.fullmatch(record) is not None


def _tree_ok(tree: dict[str, Any]) -> bool:
    """Whether the tree has the shape `StateDir.prepare_tree` writes."""
    dirs, files = tree.get("dirs"), tree.get("files")
    if not _owner_ok(tree.get("root")) or not isinstance(dirs, list) or not isinstance(files, list):
        return False
    if not all(_owner_ok(d) and isinstance(d.get("path"), str) for d in dirs):
        return False
    return all(_file_ok(f, tree["version"]) for f in files)
