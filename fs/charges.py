"""Who holds which pages: each page taken from the pool is charged to a holder (a
program, within its uid) until it is freed, so quotas count pages held, and truncate,
unlink or eviction give them back."""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from symphony.fs.errors import StoreError


@dataclass(eq=False)
class Holder:
    """Whom new pages are charged to: a program (or a user's mount work) of `uid`."""

    uid: int
    quota: int | None = None  # pages this holder may hold; None: no quota of its own
    pages: int = 0  # pages charged to it and not yet freed


class PageCharges:
    """The holder of every allocated page, totals per uid, and each uid's share."""

    def __init__(self, uid_share: int | None) -> None:
        self.uid_share = uid_share  # pages one uid but root may hold; None: no bound
        self.by_uid: Counter[int] = Counter()
        self._holder_of: dict[int, Holder] = {}
        self._users: dict[int, Holder] = {}

    def user(self, uid: int) -> Holder:
        """The holder of work a uid does outside any program (the mount, /.sys/ctl)."""
        holder = self._users.get(uid)
        if holder is None:
            holder = self._users[uid] = Holder(uid)
        return holder

    def over(self, holder: Holder, n: int) -> tuple[int, Callable[[int], bool], str] | None:
        """Whether `n` more pages take `holder` past a bound: by how many, which pages
        count there (those of the holder, or of its uid), and a sentence."""
        if holder.quota is not None and holder.pages + n > holder.quota:
            return (
                holder.pages + n - holder.quota,
                lambda page: self._holder_of.get(page) is holder,
                f"page quota of {holder.quota} pages exceeded",
            )
        held = self.by_uid[holder.uid]
        if self.uid_share is not None and holder.uid != 0 and held + n > self.uid_share:
            return (
                held + n - self.uid_share,
                lambda page: getattr(self._holder_of.get(page), "uid", None) == holder.uid,
                f"uid {holder.uid} holds {held} pages; {n} more would exceed its share of "
                f"{self.uid_share}",
            )
        return None

    def charge(self, holder: Holder, pages: list[int]) -> None:
        for page in pages:
            self._holder_of[page] = holder
        holder.pages += len(pages)
        self.by_uid[holder.uid] += len(pages)

    def foreign(self, pages: list[int], holder: Holder) -> list[int]:
        """The pages (once each) charged to a uid other than `holder`'s."""
        return [
            page
            for page in dict.fromkeys(pages)
            if (other := self._holder_of.get(page)) is not None and other.uid != holder.uid
        ]

    def take_over(self, pages: list[int], holder: Holder) -> None:
        """`holder` keeps `pages` alive from now on (a fork, a copy by content): those of
        another uid are charged to it.

        Raises:
            StoreError: ENOSPC when they would take `holder` past its bounds (nothing
                changes then).
        """
        taken = self.foreign(pages, holder)
        over = self.over(holder, len(taken))
        if over is not None:
            raise StoreError(errno.ENOSPC, over[2])
        self.transfer(taken, holder)

    def transfer(self, pages: list[int], holder: Holder) -> None:
        """Charge `pages` (already charged to someone, or not) to `holder` from now on."""
        self.release(pages)
        self.charge(holder, pages)

    def release(self, pages: list[int]) -> None:
        """`pages` went back to the pool: their holders hold them no more."""
        for page in pages:
            holder = self._holder_of.pop(page, None)
            if holder is not None:
                holder.pages -= 1
                self.by_uid[holder.uid] -= 1

    def check_invariants(self, refcounts: list[int]) -> None:
        """Raise AssertionError unless every charged page is in use and the counts add up."""
        for page in self._holder_of:
            if refcounts[page] <= 0:
                raise AssertionError(f"page {page} is free but still charged")
        by_uid: Counter[int] = Counter(h.uid for h in self._holder_of.values())
        if +by_uid != +self.by_uid:
            raise AssertionError(f"charges per uid {dict(self.by_uid)}, pages {dict(by_uid)}")
