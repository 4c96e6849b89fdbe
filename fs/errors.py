"""The store's one exception: an errno and a sentence, mapped to EACCES, ENOENT... by name."""

from __future__ import annotations

import errno as errno_codes


class StoreError(Exception):
    """A KV store operation failed; `errno` says how (ENOENT, EACCES, ENOSPC, EINVAL...)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def errno_name(self) -> str:
        return errno_codes.errorcode.get(self.errno, "EIO")

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.args[0]}"
