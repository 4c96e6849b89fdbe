"""The files of a state directory (`--state DIR`): sealed JSON and a store of page blobs.

Every file is written to a temporary name, fsynced and renamed into place, so a server
killed at any moment leaves either the old or the new whole file. JSON files carry a
checksum of their content (`seal`/`unseal`) and a page blob is named by a cryptographic
digest of its bytes, so one flipped bit anywhere is found at restore instead of read
back as wrong K/V.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
DIGEST_RE = re.compile(r"[0-9a-f]{32}")


class StateFileError(ValueError):
    """A state file that cannot be read back as written: damaged, truncated, foreign."""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` so that a crash leaves the old or the new whole file."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make the renames and removals inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def seal(body: dict[str, Any]) -> bytes:
    """`body` as JSON with a checksum of its content."""
    return json.dumps({**body, "checksum": _checksum(body)}, separators=(",", ":")).encode()


def unseal(data: bytes) -> dict[str, Any]:
    """The body `seal` wrote.

    Raises:
        StateFileError: not JSON, not a map, or the checksum does not match.
    """
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise StateFileError("not JSON (truncated or damaged)") from None
    if not isinstance(body, dict) or not isinstance(body.get("checksum"), str):
        raise StateFileError("no checksum")
    checksum = body.pop("checksum")
    if _checksum(body) != checksum:
        raise StateFileError("checksum mismatch (damaged)")
    return body


def digest_of(data: bytes) -> str:
    """The name of a page blob: blake2b-128 of its bytes (cryptographic: no user can make
    two pages that share a blob)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class PageStore:
    """DIR/pages/DIGEST: each distinct page's bytes, once."""

    def __init__(self, path: Path, page_bytes: int) -> None:
        self.path = path
        self.page_bytes = page_bytes
        self.unsynced = False  # a blob was renamed into place since the folder's fsync
        path.mkdir(parents=True, exist_ok=True)

    def _blob(self, digest: str) -> Path:
        return self.path / digest

    def has(self, digest: str) -> bool:
        return self._blob(digest).exists()

    def write(self, digest: str, data: bytes) -> None:
        write_atomically(self._blob(digest), data)
        self.unsynced = True

    def read(self, digest: str) -> bytes:
        """The bytes of blob `digest`, checked against their name and size.

        Raises:
            StateFileError: missing, of the wrong size, or damaged.
        """
        try:
            data = self._blob(digest).read_bytes()
        except OSError as exc:
            raise StateFileError(f"page {digest}: {exc.strerror}") from None
        if len(data) != self.page_bytes:
            raise StateFileError(f"page {digest}: {len(data)} bytes, not {self.page_bytes}")
        if digest_of(data) != digest:
            raise StateFileError(f"page {digest}: damaged (digest mismatch)")
        return data

    def remove(self, digest: str) -> None:
        self._blob(digest).unlink(missing_ok=True)

    def link_into(self, digest: str, folder: Path) -> None:
        """Give blob `digest` a second name in `folder` (a hard link: no copy), if it is
        there, so a file set aside keeps its pages when the store drops them."""
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.link(self._blob(digest), folder / digest)

    def names(self) -> list[str]:
        """Every name in the folder (blobs and leftover temporary files)."""
        return [p.name for p in self.path.iterdir()]
