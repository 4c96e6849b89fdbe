"""What one uid may have of the syscall server at once: connections (and /.sys/ctl
sessions), and requests in flight with the bytes they hold. Root is not bounded."""

from __future__ import annotations

import errno

import trio

from symphony.fs.errors import StoreError
from symphony.fs.nodes import Cred

UNIT = 256 * 1024  # a request holds one unit of its uid's budget per 256 KiB, at least one


class InFlight:
    """A uid's requests in flight, counted in units of their frames' bytes: many small
    requests or a few large ones, never more than `units` * 256 KiB held."""

    def __init__(self, units: int) -> None:
        self.units = units
        self._free = trio.Semaphore(units)
        self._taking = trio.Lock()  # one partial taker at a time: two cannot deadlock

    async def take(self, size: int) -> int:
        """Wait until a request of `size` bytes fits; returns the units to `give` back."""
        n = min(self.units, max(1, -(-size // UNIT)))
        async with self._taking:
            for _ in range(n):
                await self._free.acquire()
        return n

    def give(self, n: int) -> None:
        for _ in range(n):
            self._free.release()


class Admission:
    """Connections open and requests in flight, per uid."""

    def __init__(self, max_connections: int, max_in_flight: int) -> None:
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight  # units of InFlight
        self._connections: dict[int, int] = {}
        self._in_flight: dict[int, InFlight] = {}

    def admit(self, cred: Cred) -> None:
        """Count one more connection (or /.sys/ctl session) of `cred`'s uid.

        Raises:
            StoreError: EAGAIN when a uid but root's has max_connections open.
        """
        count = self._connections.get(cred.uid, 0)
        if count >= self.max_connections and not cred.is_root:
            raise StoreError(
                errno.EAGAIN, f"uid {cred.uid} has {count} connections open, the most allowed"
            )
        self._connections[cred.uid] = count + 1

    def release(self, cred: Cred) -> None:
        self._connections[cred.uid] -= 1
        if not self._connections[cred.uid]:
            del self._connections[cred.uid]
            self._in_flight.pop(cred.uid, None)

    def in_flight(self, cred: Cred) -> InFlight | None:
        """The uid's budget of requests in flight (None for root); while it has a
        connection."""
        if cred.is_root:
            return None
        budget = self._in_flight.get(cred.uid)
        if budget is None:
            budget = self._in_flight[cred.uid] = InFlight(self.max_in_flight)
        return budget
