"""The namespace's nodes: directories and KV files, with POSIX owner, group and mode."""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from symphony.fs.grammar import Grammar


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class Cred:
    """Who asks: the peer's uid and groups (SO_PEERCRED, or the FUSE request context)."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


ROOT = Cred(0, 0)
COMPUTED = "computed"


def imported_by(uid: int) -> str:
    return f"imported by uid {uid}"


R_OK, W_OK, X_OK = 4, 2, 1


class Journal:
    """What changed since someone last asked: inodes whose attributes changed, and names
    removed. The FUSE adapter reads it to keep the kernel's caches true; off by default."""

    def __init__(self) -> None:
        self.enabled = False
        self.inodes: set[int] = set()
        self.removed: list[tuple[int, str]] = []  # (directory inode, name)
        # counts changes of the tree (names) and of owners and modes, always: the state
        # directory writes namespace.json again only when it moved
        self.tree_version = 0

    def changed(self, inode: int) -> None:
        if self.enabled:
            self.inodes.add(inode)

    def unnamed(self, directory: int, name: str) -> None:
        if self.enabled:
            self.removed.append((directory, name))


@dataclass
class Node:
    """What every inode has."""

    inode: int
    mode: int  # type bits and permission bits, as st_mode
    uid: int
    gid: int
    nlink: int = 1
    atime_ns: int = field(default_factory=now_ns)
    mtime_ns: int = field(default_factory=now_ns)
    ctime_ns: int = field(default_factory=now_ns)
    journal: Journal | None = field(default=None, repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def allows(self, cred: Cred, want: int) -> bool:
        """POSIX permission check of `want` (R_OK | W_OK | X_OK bits) for `cred`."""
        if cred.is_root:
            # root passes r/w always, x when anyone has x or it is a directory
            return not (want & X_OK) or self.is_dir or bool(self.mode & 0o111)
        if cred.uid == self.uid:
            bits = (self.mode >> 6) & 7
        elif cred.in_group(self.gid):
            bits = (self.mode >> 3) & 7
        else:
            bits = self.mode & 7
        return bits & want == want

    def touch(self, modified: bool = True) -> None:
        t = now_ns()
        self.ctime_ns = t
        if modified:
            self.mtime_ns = t
        if self.journal is not None:
            self.journal.changed(self.inode)
            if not modified:  # an attribute (owner, mode, a name) changed, not the data
                self.journal.tree_version += 1


@dataclass
class Directory(Node):
    """A directory: names to inode numbers, and the directory holding it."""

    children: dict[str, int] = field(default_factory=dict)
    parent: int = 1


@dataclass
class KVFile(Node):
    """A KV context: token ids, the pages holding their K/V, the hash of each full page."""

    domain: str = ""  # prefix-cache domain its pages are indexed under
    # "computed" (every K/V computed by this engine) or "imported by uid N": pages whose
    # K/V depend on imported bytes (the file's own, and all computed after them) are
    # never indexed; forks carry the origin
    origin: str = COMPUTED
    token_ids: list[int] = field(default_factory=list)
    # the RoPE position of each token; None: token i sits at position i (the default)
    positions: list[int] | None = None
    # the first token computed at a position other than its index or under a mask other
    # than causal: pages from the one holding it on never enter the prefix index, and
    # appends after it are never fed from the index. None: every token is plain
    custom_from: int | None = None
    # the attention ranges of each token computed under a mask (by index): computing the
    # last token again (for the prediction after it) needs its mask
    masks: dict[int, list[int]] = field(default_factory=dict)
    cached_tokens: int = 0  # tokens whose pages came from the prefix index, not computed
    # what the tokens from grammar.start on must match, and where its matcher stands
    grammar: Grammar | None = field(default=None, repr=False, compare=False)
    pages: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # one per full page, chained
    open_count: int = 0
    busy: bool = False  # an append is in flight

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def position_list(self) -> list[int]:
        """Every token's position (a copy)."""
        if self.positions is None:
            return list(range(self.num_tokens))
        return list(self.positions)

    @property
    def next_position(self) -> int:
        """Where a token appended without an explicit position goes: after the last."""
        if self.positions is None or not self.positions:
            return self.num_tokens
        return self.positions[-1] + 1

    def keep_first(self, num_tokens: int) -> None:
        """Drop the tokens past the first `num_tokens` (their pages are the caller's)."""
        del self.token_ids[num_tokens:]
        if self.positions is not None:
            del self.positions[num_tokens:]
            if self.positions == list(range(num_tokens)):
                self.positions = None
        if self.custom_from is not None and self.custom_from >= num_tokens:
            self.custom_from = None
        if self.masks:
            self.masks = {i: r for i, r in self.masks.items() if i < num_tokens}
        self.cached_tokens = min(self.cached_tokens, num_tokens)
