"""Cluster allocations in flight: an allocating write takes its new clusters under the
image's lock, writes their data with the lock released, and links them into the L2 table
under the lock again (QEMU's QCowL2Meta and handle_dependencies, block/qcow2-cluster.c).

Until it links them, the L2 entries of its guest clusters still say what they said before,
so readers see the old data and a write-back never names a cluster whose data is not yet
written. Whatever would change those guest clusters meanwhile (another allocating write,
zeroing, discard, emptying the image) waits for the allocation to end and then maps again;
requests on other clusters go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType

import trio


@dataclass(eq=False)
class ClusterAllocation:
    """Guest clusters [start, end) being written to host clusters from ``host`` on."""

    start: int
    end: int
    host: int
    reused: bool
    """The guest cluster keeps the host cluster it held (zeroed without unmap): nothing new
    to free if the write fails, nothing old to free when it links."""
    done: trio.Event = field(default_factory=trio.Event)


class Allocations:
    """The allocations in flight on one image (at most a few: a list is the fastest)."""

    def __init__(self) -> None:
        self._in_flight: list[ClusterAllocation] = []

    def __bool__(self) -> bool:
        return bool(self._in_flight)

    def blocking(self, start: int, end: int) -> ClusterAllocation | None:
        """An allocation in flight that overlaps guest bytes [start, end), if any."""
        for allocation in self._in_flight:
            if allocation.start < end and start < allocation.end:
                return allocation
        return None

    def clip(self, start: int, end: int) -> int:
        """``end``, or the start of the first allocation in flight that begins within
        (start, end): a new allocation from ``start`` must stop there."""
        for allocation in self._in_flight:
            if start < allocation.start < end:
                end = allocation.start
        return end

    def begin(self, start: int, end: int, host: int, reused: bool) -> ClusterAllocation:
        allocation = ClusterAllocation(start, end, host, reused)
        self._in_flight.append(allocation)
        return allocation

    def finish(self, allocation: ClusterAllocation) -> None:
        """It linked its clusters, or gave them up: who waits for it maps again."""
        self._in_flight.remove(allocation)
        allocation.done.set()


class Settled:
    """``async with``: the image's lock, taken once no allocation in flight overlaps guest
    bytes [start, end), for a change of their clusters (a class, not a generator: zeroing
    and discard take it on every request)."""

    __slots__ = ("allocations", "end", "lock", "start")

    def __init__(self, lock: trio.Lock, allocations: Allocations, start: int, end: int) -> None:
        self.lock, self.allocations, self.start, self.end = lock, allocations, start, end

    async def __aenter__(self) -> None:
        while True:
            await self.lock.acquire()
            blocking = self.allocations.blocking(self.start, self.end)
            if blocking is None:
                return
            self.lock.release()
            await blocking.done.wait()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.lock.release()
