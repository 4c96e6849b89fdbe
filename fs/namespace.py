"""The POSIX tree of the store: paths to nodes, permission checks, directory operations."""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

from symphony.fs.errors import StoreError
from symphony.fs.nodes import R_OK, W_OK, X_OK, Cred, Directory, Journal, KVFile, Node

ROOT_INODE = 1
NAME_MAX = 255


def split_path(path: str) -> list[str]:
    """Components of a path relative to the mount root ('' and '/' are the root).

    Raises:
        StoreError: EINVAL for '.', '..' or an over-long name.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise StoreError(errno.EINVAL, f"path {path!r} may not contain '.' or '..'")
        try:
            encoded = part.encode()
        except UnicodeEncodeError:  # a name decoded with surrogateescape: not UTF-8
            raise StoreError(errno.EINVAL, f"names are UTF-8; {path!r} is not") from None
        if len(encoded) > NAME_MAX:
            raise StoreError(errno.ENAMETOOLONG, f"name longer than {NAME_MAX} bytes in {path!r}")
        if "\0" in part:
            raise StoreError(errno.EINVAL, "path contains a NUL byte")
    return parts


def _no_slash_after_file(path: str) -> None:
    """A trailing slash names a directory (POSIX): never a KV file."""
    if path.endswith("/"):
        raise StoreError(errno.ENOTDIR, f"not a directory: {path}")


def decode_name(raw: bytes) -> str:
    """One name as the kernel hands it (bytes) as the namespace keeps it (text).

    Raises:
        StoreError: ENAMETOOLONG past NAME_MAX bytes, EINVAL for a name that is not
            UTF-8 (names are text for the syscalls too, so only UTF-8 ones are stored).
    """
    if len(raw) > NAME_MAX:
        raise StoreError(errno.ENAMETOOLONG, f"a name is at most {NAME_MAX} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise StoreError(errno.EINVAL, f"names on the mount are UTF-8; {raw!r} is not") from None


class Namespace:
    """Inode table and tree. `on_last_link` is called when a file loses its last name."""

    def __init__(self, on_last_link: Callable[[KVFile], None], root_mode: int = 0o755) -> None:
        self.journal = Journal()
        root = Directory(ROOT_INODE, stat.S_IFDIR | root_mode, 0, 0, nlink=2, journal=self.journal)
        self.nodes: dict[int, Node] = {ROOT_INODE: root}
        self._next_inode = ROOT_INODE + 1
        self._on_last_link = on_last_link

    def new_inode(self) -> int:
        """A number no node has had (nameless files, such as a verification's scratch)."""
        inode = self._next_inode
        self._next_inode += 1
        return inode

    @property
    def root(self) -> Directory:
        root = self.nodes[ROOT_INODE]
        assert isinstance(root, Directory)
        return root

    def check(self, node: Node, cred: Cred, want: int, path: str) -> None:
        if not node.allows(cred, want):
            raise StoreError(errno.EACCES, f"permission denied: {path or '/'}")

    def lookup(self, path: str, cred: Cred) -> Node:
        """The node at `path`, checking search (x) permission on every directory on the way."""
        node: Node = self.root
        for part in split_path(path):
            if not isinstance(node, Directory):
                raise StoreError(errno.ENOTDIR, f"not a directory on the way to {path}")
            self.check(node, cred, X_OK, path)
            child = node.children.get(part)
            if child is None:
                raise StoreError(errno.ENOENT, f"no such file or directory: {path}")
            node = self.nodes[child]
        return node

    def parent_of(self, path: str, cred: Cred) -> tuple[Directory, str]:
        """The directory that holds `path`'s last component, and that component."""
        parts = split_path(path)
        if not parts:
            raise StoreError(errno.EINVAL, "the root has no parent")
        parent = self.lookup("/".join(parts[:-1]), cred)
        if not isinstance(parent, Directory):
            raise StoreError(errno.ENOTDIR, f"not a directory: {'/'.join(parts[:-1])}")
        return parent, parts[-1]

    def lookup_file(self, path: str, cred: Cred, want: int = 0) -> KVFile:
        node = self.lookup(path, cred)
        if not isinstance(node, KVFile):
            raise StoreError(errno.EISDIR, f"is a directory: {path}")
        if path.endswith("/"):  # as open(2): a trailing slash names a directory
            raise StoreError(errno.ENOTDIR, f"not a directory: {path}")
        if want:
            self.check(node, cred, want, path)
        return node

    def _insert(self, parent: Directory, name: str, node: Node, cred: Cred, path: str) -> None:
        self.check(parent, cred, W_OK | X_OK, path)
        if name in parent.children:
            raise StoreError(errno.EEXIST, f"file exists: {path}")
        parent.children[name] = node.inode
        self.journal.tree_version += 1
        self.nodes[node.inode] = node
        node.journal = self.journal
        parent.touch()

    def create_file(self, path: str, cred: Cred, mode: int, domain: str) -> KVFile:
        if path.endswith("/"):  # as open(2) with O_CREAT: only a directory ends with /
            raise StoreError(errno.EISDIR, f"a KV file's name cannot end with '/': {path}")
        parent, name = self.parent_of(path, cred)
        gid = parent.gid if parent.mode & stat.S_ISGID else cred.gid
        node = KVFile(
            self.new_inode(), stat.S_IFREG | (mode & 0o7777), cred.uid, gid, domain=domain
        )
        self._insert(parent, name, node, cred, path)
        return node

    def mkdir(self, path: str, cred: Cred, mode: int = 0o755) -> Directory:
        parent, name = self.parent_of(path, cred)
        return self._mkdir_in(parent, name, cred, mode, path)

    def makedirs(self, path: str, cred: Cred, mode: int = 0o755) -> Directory:
        """`mkdir -p`: make every missing directory of `path` in one walk from the root.

        Directories that exist already are fine (they need search permission, a new one
        write permission on its parent, as for mkdir).

        Raises:
            StoreError: ENOTDIR if a component on the way is a file, EEXIST if the last
                one is, EACCES.
        """
        parts = split_path(path)
        node: Node = self.root
        for depth, part in enumerate(parts):
            if not isinstance(node, Directory):
                raise StoreError(errno.ENOTDIR, f"not a directory: {'/'.join(parts[:depth])}")
            self.check(node, cred, X_OK, path)
            child = node.children.get(part)
            if child is None:
                node = self._mkdir_in(node, part, cred, mode, path)
            else:
                node = self.nodes[child]
        if not isinstance(node, Directory):
            raise StoreError(errno.EEXIST, f"file exists: {path}")
        return node

    def _mkdir_in(
        self, parent: Directory, name: str, cred: Cred, mode: int, path: str
    ) -> Directory:
        gid = parent.gid if parent.mode & stat.S_ISGID else cred.gid
        node = Directory(
            self.new_inode(),
            stat.S_IFDIR | (mode & 0o7777),
            cred.uid,
            gid,
            nlink=2,
            parent=parent.inode,
        )
        self._insert(parent, name, node, cred, path)
        parent.nlink += 1
        return node

    def _removable(self, path: str, cred: Cred) -> tuple[Directory, str, Node]:
        """Parent, name and node of an entry `cred` may remove (write + search on the
        parent; in a sticky directory, only the owner of the entry or of the directory)."""
        parent, name = self.parent_of(path, cred)
        self.check(parent, cred, W_OK | X_OK, path)
        node = self.lookup(path, cred)
        sticky = parent.mode & stat.S_ISVTX
        if sticky and not cred.is_root and cred.uid not in (parent.uid, node.uid):
            raise StoreError(errno.EPERM, f"sticky directory: {path}")
        return parent, name, node

    def unlink(self, path: str, cred: Cred) -> KVFile:
        parent, name, node = self._removable(path, cred)
        if not isinstance(node, KVFile):
            raise StoreError(errno.EISDIR, f"is a directory: {path}")
        _no_slash_after_file(path)
        del parent.children[name]
        self.journal.tree_version += 1
        self.journal.unnamed(parent.inode, name)
        parent.touch()
        node.nlink -= 1
        node.touch(modified=False)
        if node.nlink == 0:
            del self.nodes[node.inode]
            self._on_last_link(node)
        return node

    def rmdir(self, path: str, cred: Cred) -> None:
        parent, name, node = self._removable(path, cred)
        if not isinstance(node, Directory):
            raise StoreError(errno.ENOTDIR, f"not a directory: {path}")
        if node.children:
            raise StoreError(errno.ENOTEMPTY, f"directory not empty: {path}")
        del parent.children[name]
        self.journal.tree_version += 1
        self.journal.unnamed(parent.inode, name)
        del self.nodes[node.inode]
        parent.nlink -= 1
        parent.touch()

    def link(self, src: str, dst: str, cred: Cred) -> KVFile:
        return self.link_node(self.lookup_file(src, cred), dst, cred)

    def link_node(self, node: KVFile, dst: str, cred: Cred) -> KVFile:
        """Give the file `node` another name, `dst`."""
        _no_slash_after_file(dst)
        parent, name = self.parent_of(dst, cred)
        self._insert(parent, name, node, cred, dst)
        node.nlink += 1
        node.touch(modified=False)
        return node

    def rename(self, src: str, dst: str, cred: Cred) -> None:
        """Move `src` to `dst`, replacing a file there (never a non-empty directory)."""
        src_parent, src_name, node = self._removable(src, cred)
        if isinstance(node, KVFile):
            _no_slash_after_file(src)
            _no_slash_after_file(dst)
        dst_parent, dst_name = self.parent_of(dst, cred)
        self.check(dst_parent, cred, W_OK | X_OK, dst)
        if isinstance(node, Directory) and self._is_within(dst_parent, node):
            raise StoreError(errno.EINVAL, f"cannot move {src} into itself")
        existing = dst_parent.children.get(dst_name)
        if existing == node.inode:
            return
        if existing is not None:
            target = self.nodes[existing]
            if isinstance(target, Directory):
                if not isinstance(node, Directory):
                    raise StoreError(errno.EISDIR, f"is a directory: {dst}")
                self.rmdir(dst, cred)
            else:
                if isinstance(node, Directory):
                    raise StoreError(errno.ENOTDIR, f"not a directory: {dst}")
                self.unlink(dst, cred)
        del src_parent.children[src_name]
        self.journal.tree_version += 1
        self.journal.unnamed(src_parent.inode, src_name)
        dst_parent.children[dst_name] = node.inode
        if isinstance(node, Directory) and src_parent is not dst_parent:
            src_parent.nlink -= 1
            dst_parent.nlink += 1
            node.parent = dst_parent.inode
        src_parent.touch()
        dst_parent.touch()
        node.touch(modified=False)

    def _is_within(self, node: Directory, ancestor: Directory) -> bool:
        """Whether `node` is `ancestor` or lies below it: a walk up from `node` (its
        depth, never a recursion over what lies below `ancestor`)."""
        while node is not ancestor:
            if node.inode == ROOT_INODE:
                return False
            parent = self.nodes[node.parent]
            assert isinstance(parent, Directory)
            node = parent
        return True

    def chmod(self, path: str, cred: Cred, mode: int) -> None:
        self.chmod_node(self.lookup(path, cred), cred, mode, path)

    @staticmethod
    def chmod_node(node: Node, cred: Cred, mode: int, path: str = "") -> None:
        if not cred.is_root and cred.uid != node.uid:
            raise StoreError(errno.EPERM, f"only the owner may chmod {path or node.inode}")
        node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        node.touch(modified=False)

    def chown(self, path: str, cred: Cred, uid: int | None, gid: int | None) -> None:
        self.chown_node(self.lookup(path, cred), cred, uid, gid, path)

    @staticmethod
    def chown_node(
        node: Node, cred: Cred, uid: int | None, gid: int | None, path: str = ""
    ) -> None:
        what = path or node.inode
        if not cred.is_root:
            if uid is not None and uid != node.uid:
                raise StoreError(errno.EPERM, f"only root may change the owner of {what}")
            if gid is not None and (cred.uid != node.uid or not cred.in_group(gid)):
                raise StoreError(errno.EPERM, f"cannot give {what} to group {gid}")
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        node.touch(modified=False)

    def listdir(self, path: str, cred: Cred) -> list[str]:
        node = self.lookup(path, cred)
        if not isinstance(node, Directory):
            raise StoreError(errno.ENOTDIR, f"not a directory: {path}")
        self.check(node, cred, R_OK, path)
        return sorted(node.children)

    def path_of(self, inode: int) -> str:
        """The path of a directory (directories have one name; files may have several)."""
        parts = []
        node = self.nodes.get(inode)
        if not isinstance(node, Directory):
            raise StoreError(errno.ENOENT, f"no directory with inode {inode}")
        while node.inode != ROOT_INODE:
            parent = self.nodes[node.parent]
            assert isinstance(parent, Directory)
            parts.append(next(n for n, i in parent.children.items() if i == node.inode))
            node = parent
        return "/".join(reversed(parts))

    def files(self) -> list[KVFile]:
        return [n for n in self.nodes.values() if isinstance(n, KVFile)]
