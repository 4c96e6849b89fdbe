"""A LIP's limits as its caller asks them, and the server's caps over every caller."""

from __future__ import annotations

import dataclasses
import errno
import unicodedata
from dataclasses import dataclass
from typing import Any

from symphony.fs.errors import StoreError

MAX_LIMIT = 1 << 62  # above any real limit, below what setrlimit's rlim_t overflows at
MAX_NAME = 255  # characters of a program's name kept for ps and /.sys/procs

# name: (smallest value, may be None)
_RANGES: dict[str, tuple[int, bool]] = {
    "cpu_seconds": (1, False),
    "wall_seconds": (1, True),
    "tokens": (0, True),
    "address_space": (1 << 26, False),
    "open_files": (16, False),
    "pages": (0, True),
    "priority": (-MAX_LIMIT, False),
}


@dataclass(frozen=True)
class ProcessCaps:
    """What the server allows any LIP at most, and how many LIPs one uid may run.

    rlimits asked above a cap are lowered to it (the row in `ps` shows the limits a LIP
    really has); root's LIPs are capped alike, but root may run any number of LIPs.
    """

    max_lips_per_uid: int = 16  # running LIPs of one uid, so every tenant keeps a share
    max_cpu_seconds: int = 24 * 3600
    max_address_space: int = 8 << 30
    max_open_files: int = 1024
    max_tasks_per_uid: int = 4096  # RLIMIT_NPROC: processes and threads of the uid

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, not {value!r}")
            if value > MAX_LIMIT:
                raise ValueError(f"{f.name} must be at most {MAX_LIMIT}")
        if self.max_open_files < 16 or self.max_address_space < 1 << 26:
            raise ValueError("max_open_files must be at least 16, max_address_space 64 MiB")


@dataclass(frozen=True)
class Limits:
    """rlimits and scheduling limits of one LIP."""

    cpu_seconds: int = 3600
    wall_seconds: int | None = None  # killed when it runs longer
    tokens: int | None = None  # tokens the scheduler computes for it, at most
    address_space: int = 4 << 30
    open_files: int = 256
    pages: int | None = None
    priority: int = 0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Limits:
        """Limits from a spawn call's `limits` map; a missing or None value is the default.

        Raises:
            StoreError: EINVAL naming the first unknown name or bad value (not an
                integer, a bool, below the least a program needs, or absurdly large).
        """
        values: dict[str, int | None] = {}
        for key, value in args.items():
            if not isinstance(key, str) or key not in _RANGES:
                raise StoreError(errno.EINVAL, f"unknown limit {key!r}")
            least, optional = _RANGES[key]
            if value is None:
                if optional:
                    values[key] = None
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(errno.EINVAL, f"limit {key} must be an integer")
            if value < least:
                raise StoreError(errno.EINVAL, f"limit {key} must be at least {least}")
            if abs(value) > MAX_LIMIT:
                raise StoreError(errno.EINVAL, f"limit {key} must be at most {MAX_LIMIT}")
            values[key] = value
        return cls(**values)  # type: ignore[arg-type]

    def capped(self, caps: ProcessCaps) -> Limits:
        """These limits, with each rlimit lowered to the server's cap."""
        return dataclasses.replace(
            self,
            cpu_seconds=min(self.cpu_seconds, caps.max_cpu_seconds),
            address_space=min(self.address_space, caps.max_address_space),
            open_files=min(self.open_files, caps.max_open_files),
        )

    def rlimits(self, caps: ProcessCaps) -> str:
        """The launcher's LIMITS argument (sched/launcher.py)."""
        return (
            f"cpu={self.cpu_seconds},as={self.address_space},"
            f"nofile={self.open_files},nproc={caps.max_tasks_per_uid}"
        )

    def row(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


def safe_name(name: str) -> str:
    """`name` fit for one field of a line: control characters and line or paragraph
    separators escaped (`\\n`, `\\x1b`, `\\u2028`), cut to MAX_NAME characters."""
    out = []
    for ch in name[: MAX_NAME * 2]:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch == "\\":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    text = "".join(out)
    return text if len(text) <= MAX_NAME else text[: MAX_NAME - 3] + "..."
