"""The request path's accounting, written once for backends and nodes: in-flight tracking
for drain, per-kind statistics, errors; and the alignment helpers.

Drain is how a graph change stays atomic for I/O (QEMU's bdrv_drained_begin, device-mapper's
suspend): while a :meth:`Tracker.drained` block runs, new requests wait at the door, and the
block only starts once the requests already inside have finished.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from time import perf_counter_ns
from typing import TypeVar, TypeVarTuple

import trio

Ts = TypeVarTuple("Ts")
T = TypeVar("T")


class Tracker:
    """Counts requests in flight; :meth:`drained` holds new ones and waits for the rest."""

    __slots__ = ("_idle", "_resume", "in_flight", "quiesced")

    def __init__(self) -> None:
        self.in_flight = 0
        self.quiesced = 0
        self._idle: trio.Event | None = None
        self._resume = trio.Event()

    async def enter(self) -> None:
        """Admit one request, waiting while the tracker is drained (:meth:`Requests.run`
        does the same inline)."""
        while self.quiesced:
            await self._resume.wait()
        self.in_flight += 1

    def try_enter(self) -> bool:
        """Admit one request if the tracker is not drained (no waiting)."""
        if self.quiesced:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def hold(self) -> None:
        """Hold new requests at the door until :meth:`release`, without waiting for those
        inside (a paused backend: they wait themselves)."""
        if self.quiesced == 0:
            self._resume = trio.Event()
        self.quiesced += 1

    def release(self) -> None:
        self.quiesced -= 1
        if self.quiesced == 0:
            self._resume.set()

    async def idle(self) -> None:
        """Wait until no request is in flight (new ones may come meanwhile)."""
        while self.in_flight:
            if self._idle is None:  # a second waiter waits for the same moment
                self._idle = trio.Event()
            await self._idle.wait()
            self._idle = None

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Run the body with no request in flight and new ones held until it ends."""
        self.hold()
        try:
            await self.idle()
            yield
        finally:
            self.release()


@dataclass
class KindStats:
    """One kind of request: how many, how many bytes, how long in total."""

    ops: int = 0
    bytes: int = 0
    ns: int = 0

    def add(self, nbytes: int, ns: int) -> None:
        """Count one request of ``nbytes`` that took ``ns``."""
        self.ops += 1
        self.bytes += nbytes
        self.ns += ns


@dataclass
class RequestStats:
    """Per-kind counters of a backend or a node (QMP's query-blockstats); a request that
    failed counts as an error only, a cancelled one not at all."""

    read: KindStats = field(default_factory=KindStats)
    write: KindStats = field(default_factory=KindStats)
    flush: KindStats = field(default_factory=KindStats)
    discard: KindStats = field(default_factory=KindStats)
    zero: KindStats = field(default_factory=KindStats)
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """Flat, for status output: ``read_ops``, ``read_bytes``, ``read_ns``, ..."""
        flat = {}
        for kind in fields(self)[:-1]:
            counters = getattr(self, kind.name)
            for counter in fields(KindStats):
                flat[f"{kind.name}_{counter.name}"] = getattr(counters, counter.name)
        flat["errors"] = self.errors
        return flat


class Requests:
    """The door every request to a backend or a node goes through: counted in flight (so a
    drain can wait for it), then, once done, counted and timed in its kind's statistics."""

    __slots__ = ("stats", "tracker")

    def __init__(self) -> None:
        self.tracker = Tracker()
        self.stats = RequestStats()

    async def run(
        self,
        kind: KindStats | None,
        nbytes: int,
        call: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
    ) -> T:
        """``await call(*args)`` as one request of ``kind`` (None: tracked, not counted).

        Every request of every node passes here, so :meth:`Tracker.enter` and
        :meth:`Tracker.leave` are written out: the same steps without a call each; and
        ``call`` takes positional arguments only, which saves a keyword dict per request."""
        tracker = self.tracker
        while tracker.quiesced:
            await tracker._resume.wait()
        tracker.in_flight += 1
        start = perf_counter_ns()
        try:
            result = await call(*args)
        except trio.Cancelled:
            raise
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            tracker.in_flight -= 1
            if not tracker.in_flight and tracker._idle is not None:
                tracker._idle.set()
        if kind is not None:
            kind.ops += 1
            kind.bytes += nbytes
            kind.ns += perf_counter_ns() - start
        return result


class RangeLocks:
    """Exclusive byte ranges: a holder waits for every overlapping holder to finish (so a
    read-modify-write and a write into the same block never interleave)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, trio.Event]] = {}
        self._ids = 0

    def _overlapping(self, offset: int, end: int) -> trio.Event | None:
        return next(
            (done for start, stop, done in self._held.values() if start < end and offset < stop),
            None,
        )

    def busy(self, offset: int, length: int) -> bool:
        """True if a holder overlaps the range (a caller that would not wait can check)."""
        return bool(self._held) and self._overlapping(offset, offset + length) is not None

    @asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        end = offset + length
        while (busy := self._overlapping(offset, end)) is not None:
            await busy.wait()
        self._ids += 1
        key = self._ids
        self._held[key] = (offset, end, trio.Event())
        try:
            yield
        finally:
            self._held.pop(key)[2].set()


def align_down(value: int, align: int) -> int:
    return value - value % align


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def is_aligned(offset: int, length: int, align: int) -> bool:
    return offset % align == 0 and length % align == 0


def is_zero(data: memoryview) -> bool:
    """True if every byte of ``data`` is zero (memcmp speed through bytes comparison)."""
    return data.nbytes == 0 or (data[0] == 0 and data.tobytes() == bytes(data.nbytes))
