"""The KV store: a namespace of KV files over refcounted pages of the engine's pool.

A file is token ids plus the pages holding their K/V. Fork shares every page
(copy-on-write: a shared page is copied only when one side writes into it, which
can only be its partial last page). Appends go in two halves: `begin_append` finds
pages in the prefix index, copies a shared partial page and allocates the rest, and
returns the chunk the engine must compute; `finish_append` commits it, `abort_append`
gives everything back. The FUSE filesystem and the syscalls are two views of this.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from symphony.engine.errors import OutOfPagesError
from symphony.engine.page_pool import PagePool
from symphony.fs.appends import AppendPlan, Appends
from symphony.fs.charges import Holder, PageCharges
from symphony.fs.errors import StoreError
from symphony.fs.grammar import Grammar, Grammars
from symphony.fs.kv_concat import concat_files
from symphony.fs.kv_edit import drop_range
from symphony.fs.kv_import import ContentIndex, Importer
from symphony.fs.namespace import Namespace
from symphony.fs.nodes import COMPUTED, R_OK, W_OK, Cred, KVFile, Node, imported_by
from symphony.fs.prefix_index import PrefixIndex
from symphony.fs.store_invariants import check_store


def uid_domain(cred: Cred) -> str:
    """Default cache domain: one per uid, so tenants never hit each other's prefixes."""
    return f"uid:{cred.uid}"


class KVStore(Appends):
    """KV files in a POSIX namespace, their pages, the prefix index."""

    def __init__(
        self,
        pool: PagePool,
        fingerprint: str,
        vocab_size: int,
        max_tokens: int,
        prefix_cache: bool = True,
        domain_of: Callable[[Cred], str] = uid_domain,
        uid_share: int | None = None,
        rotate_keys: Callable[[Sequence[int], Sequence[int]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.domain_of = domain_of
        # the engine's RoPE on cached keys (Engine.rotate_keys): kv_drop and kv_concat
        # move keys to new positions with it; None: they cannot
        self.rotate_keys = rotate_keys
        self.index = PrefixIndex(pool) if prefix_cache else None
        self.ns = Namespace(self._on_last_link)
        self.content = ContentIndex(pool)  # pages by their bytes, for `cp` into the mount
        self._orphans: dict[int, KVFile] = {}  # unlinked but still open or busy
        self._plans: list[AppendPlan] = []
        self._importers: list[Importer] = []
        self._held: Counter[int] = Counter()  # pages readers of a snapshot keep alive
        self.charges = PageCharges(uid_share)  # who holds each page taken from the pool
        self.on_unlinked: Callable[[KVFile], None] | None = None  # --state forgets it
        self.grammars: Grammars | None = None  # the served tokenizer's grammar compiler
        pool.on_free = self.charges.release

    # pages --------------------------------------------------------------------------

    def allocate(self, n: int, holder: Holder | None = None) -> list[int]:
        """`n` free pages charged to `holder`, evicting cached ones if needed (first the
        holder's uid's own, if it is over its share).

        Raises:
            StoreError: ENOSPC when the pool, or the holder's quota or share, is short.
        """
        if holder is not None:
            over = self.charges.over(holder, n)
            if over is not None and self.index is not None:  # its own cached pages go first
                self.index.evict(over[0], only=over[1])
                over = self.charges.over(holder, n)
            if over is not None:
                raise StoreError(errno.ENOSPC, over[2])
        short = n - self.pool.num_free
        if short > 0 and self.index is not None:
            self.index.evict(short)
        try:
            pages = self.pool.allocate(n)
        except OutOfPagesError as exc:
            raise StoreError(errno.ENOSPC, f"out of KV pages: {exc}") from None
        if holder is not None:
            self.charges.charge(holder, pages)
        return pages

    def _release(self, file: KVFile) -> None:
        self.pool.decref(file.pages)
        file.pages, file.page_hashes = [], []
        file.keep_first(0)
        file.grammar = None

    def _on_last_link(self, file: KVFile) -> None:
        if self.on_unlinked is not None:
            self.on_unlinked(file)
        if file.open_count or file.busy:
            self._orphans[file.inode] = file
        else:
            self._release(file)

    def close(self, file: KVFile) -> None:
        """Drop one open reference; an unlinked file's pages go with its last one."""
        file.open_count -= 1
        self._maybe_reap(file)

    def _maybe_reap(self, file: KVFile) -> None:
        if file.nlink == 0 and not file.open_count and not file.busy:
            self._orphans.pop(file.inode, None)
            self._release(file)

    # files --------------------------------------------------------------------------

    def open(
        self,
        path: str,
        cred: Cred,
        create: bool = False,
        exclusive: bool = False,
        mode: int = 0o600,
    ) -> KVFile:
        """Open (or with `create`, make) the KV file at `path`; needs read permission."""
        try:
            file = self.ns.lookup_file(path, cred)
        except StoreError as exc:
            if exc.errno != errno.ENOENT or not create:
                raise
            return self.ns.create_file(path, cred, mode, self.domain_of(cred))
        if create and exclusive:
            raise StoreError(errno.EEXIST, f"file exists: {path}")
        self.ns.check(file, cred, R_OK, path)
        return file

    def stat(self, path: str, cred: Cred) -> dict[str, Any]:
        """The file's attributes; its grammar (content, not an attribute) only for a
        caller who may read it."""
        file = self.ns.lookup_file(path, cred)
        stat = self.file_stat(file)
        if not file.allows(cred, R_OK):
            stat["grammar"] = None
        return stat

    def file_stat(self, file: KVFile) -> dict[str, Any]:
        return {
            "tokens": file.num_tokens,
            "next_position": file.next_position,
            "pages": len(file.pages),
            "shared_pages": self.num_shared(file),
            "mode": file.mode,
            "uid": file.uid,
            "gid": file.gid,
            "nlink": file.nlink,
            "mtime_ns": file.mtime_ns,
            "origin": file.origin,
            "grammar": None if file.grammar is None else file.grammar.spec.wire(),
        }

    def num_shared(self, file: KVFile) -> int:
        """Pages of `file` that another file (or work in flight) also references."""
        return sum(1 for p in file.pages if self._other_refs(p) > 1)

    def _other_refs(self, page: int) -> int:
        """References to `page` but the prefix index's and those of snapshot readers."""
        indexed = self.index is not None and self.index.is_indexed(page)
        return self.pool.refcounts[page] - int(indexed) - self._held[page]

    def fork(
        self,
        src: str,
        dst: str,
        cred: Cred,
        mode: int | None = None,
        holder: Holder | None = None,
    ) -> KVFile:
        """Make `dst` a copy-on-write copy of `src`: same tokens, every page shared.

        Pages of another uid's that the copy shares are charged to `holder` (by default
        `cred`'s uid) from now on: who forks keeps them alive, and the other uid's
        unlink gives them back to it.

        Raises:
            StoreError: ENOSPC when those pages would take `holder` past its bounds.
        """
        source = self.ns.lookup_file(src, cred, R_OK)
        holder = self.charges.user(cred.uid) if holder is None else holder
        mode = source.mode if mode is None else mode
        self.charges.take_over(source.pages, holder)  # before the name: ENOSPC makes none
        copy = self.ns.create_file(dst, cred, mode, self.domain_of(cred))
        self.pool.incref(source.pages)
        copy.pages = list(source.pages)
        copy.token_ids = list(source.token_ids)
        copy.positions = None if source.positions is None else list(source.positions)
        copy.custom_from, copy.cached_tokens = source.custom_from, source.cached_tokens
        copy.masks = dict(source.masks)
        copy.origin = source.origin
        if source.grammar is not None:  # where the source's matcher stood, not its plans'
            copy.grammar = source.grammar.at(copy.num_tokens)
        if copy.domain == source.domain:
            copy.page_hashes = list(source.page_hashes)
        else:  # the copy's prefixes are looked up in its owner's domain, not the source's
            self._hash_full_pages(copy, index=False)
        return copy

    def truncate(self, path: str, num_tokens: int, cred: Cred) -> None:
        """Roll `path` back to its first `num_tokens` tokens."""
        self.truncate_file(self.ns.lookup_file(path, cred, W_OK), num_tokens)

    def truncate_file(self, file: KVFile, num_tokens: int) -> None:
        if not 0 <= num_tokens <= file.num_tokens:
            raise StoreError(
                errno.EINVAL,
                f"cannot truncate a {file.num_tokens}-token file to {num_tokens} tokens",
            )
        if file.busy:
            raise StoreError(errno.EBUSY, "an append to this file is in flight")
        # the matcher goes back with the tokens (back before the grammar began, it
        # constrains from the new end); made first, so a failure changes nothing
        grammar = None if file.grammar is None else file.grammar.at(num_tokens)
        keep = -(-num_tokens // self.page_size)
        self.pool.decref(file.pages[keep:])
        del file.pages[keep:]
        del file.page_hashes[num_tokens // self.page_size :]
        file.keep_first(num_tokens)
        file.grammar = grammar
        if not num_tokens:  # nothing imported is left
            file.origin = COMPUTED
        file.touch()

    def drop(
        self,
        path: str,
        start: int,
        end: int,
        cred: Cred,
        holder: Holder | None = None,
        reposition: bool = False,
    ) -> None:
        """Remove tokens [start, end) of `path` (kv_edit.drop_range)."""
        file = self.ns.lookup_file(path, cred, W_OK)
        holder = self.charges.user(cred.uid) if holder is None else holder
        drop_range(self, file, start, end, holder, reposition)

    def concat(
        self,
        dst: str,
        srcs: Sequence[str],
        cred: Cred,
        reposition: bool = True,
        mode: int = 0o600,
        holder: Holder | None = None,
    ) -> KVFile:
        """Make `dst` hold the tokens of `srcs`, one after another (kv_concat.concat_files)."""
        holder = self.charges.user(cred.uid) if holder is None else holder
        return concat_files(self, dst, srcs, cred, reposition, mode, holder)

    def constrain(self, file: KVFile, grammar: Grammar | None) -> None:
        """Make what follows the file's last token match `grammar`, fresh from compiling
        (or one already fed the file's tokens from its start: an import, a restore);
        None frees the file of its grammar."""
        if file.busy:
            raise StoreError(errno.EBUSY, "an append to this file is in flight")
        if grammar is not None:
            if not grammar.fed:
                grammar.start = file.num_tokens
            assert grammar.fed == file.num_tokens - grammar.start
        file.grammar = grammar
        file.touch(modified=False)

    def rehash(self, file: KVFile, index: bool = True) -> None:
        """Extend the file's page hash chain after an edit cut it back (listing plain
        pages in the prefix index unless `index` is False)."""
        self._hash_full_pages(file, index)

    def hold(self, pages: list[int]) -> None:
        """Keep `pages` alive for a reader of a file's snapshot (the file may change).
        A reader's references are not sharing (num_shared leaves them out)."""
        self.pool.incref(pages, quiet=True)
        self._held.update(pages)

    def unhold(self, pages: list[int]) -> None:
        self._held.subtract(pages)
        self.pool.decref(pages, quiet=True)

    def importer(
        self, cred: Cred, domain: str | None = None, holder: Holder | None = None
    ) -> Importer:
        """A new import by `cred` (sharing pages noted in `domain`, by default the one of
        `cred`; new pages charged to `holder`, by default `cred`'s uid); its pages count
        in check_invariants until committed or aborted."""
        self._importers = [i for i in self._importers if not i.ended]
        holder = self.charges.user(cred.uid) if holder is None else holder
        imported = Importer(
            self.pool,
            self.fingerprint,
            self.content,
            self.max_tokens,
            self.vocab_size,
            self.domain_of(cred) if domain is None else domain,
            holder,
            lambda n: self.allocate(n, holder),
        )
        self._importers.append(imported)
        return imported

    def commit_import(self, file: KVFile, imported: Importer) -> None:
        """Make the empty `file` hold what `imported` read; its pages pass to the file.

        Imported pages never enter the prefix index: their bytes were not computed here.
        """
        if file.num_tokens or file.busy:
            imported.abort()
            raise StoreError(errno.EBUSY, "the file changed during the import")
        assert imported.token_ids is not None
        try:  # pages shared by content with another uid's are the importer's from now on
            self.charges.take_over(imported.pages, imported.holder)
        except StoreError:
            imported.abort()
            raise
        file.pages, imported.pages = imported.pages, []
        imported.ended = True
        file.grammar = None  # the bytes bring their own, if any (the mount attaches it)
        file.token_ids = list(imported.token_ids)
        file.positions, file.custom_from = imported.positions, imported.custom_from
        file.origin = imported_by(imported.uid)
        self._hash_full_pages(file)
        file.touch()

    def scratch_file(self, domain: str) -> KVFile:
        """A nameless file, open once, for work such as a verification's recomputation;
        `close` it and its pages go."""
        file = KVFile(self.ns.new_inode(), 0o100600, 0, 0, nlink=0, domain=domain)
        file.open_count = 1
        self._orphans[file.inode] = file
        return file

    def adopt_pages(self, file: KVFile, computed: KVFile) -> None:
        """Make `file` hold the pages of `computed`, the same tokens computed here: its
        K/V are now this engine's own, so it is computed (and its pages indexed)."""
        if file.busy or file.token_ids != computed.token_ids:
            raise StoreError(errno.EBUSY, "the file changed during its verification")
        self.pool.incref(computed.pages)
        self.pool.decref(file.pages)
        file.pages = list(computed.pages)
        # the pages are the owner's now, whoever asked for the verification
        self.charges.transfer(file.pages, self.charges.user(file.uid))
        file.page_hashes = []
        file.origin = COMPUTED
        self._hash_full_pages(file)
        file.touch(modified=False)  # the same tokens and, within tolerance, the same K/V

    def node(self, inode: int) -> Node | None:
        """The node numbered `inode`: named, or a file unlinked but still open."""
        return self.ns.nodes.get(inode) or self._orphans.get(inode)

    def all_files(self) -> list[KVFile]:
        """Every file with a name, and those unlinked but still open."""
        return [*self.ns.files(), *self._orphans.values()]

    def unlink(self, path: str, cred: Cred) -> None:
        self.ns.unlink(path, cred)

    # the whole store ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cached = self.index.num_cached() if self.index is not None else 0
        free = self.pool.num_free
        shared = sum(1 for p in range(self.pool.num_pages) if self._other_refs(p) > 1)
        return {
            "pages": {
                "total": self.pool.num_pages,
                "used": self.pool.num_pages - free - cached,
                "cached": cached,
                "free": free,
                "shared": shared,  # used pages that several files (or calls) reference
            },
            "files": len(self.ns.files()),
        }

    def check_invariants(self) -> None:
        """Raise AssertionError unless refcounts, files, index, pool and charges agree."""
        check_store(self)
