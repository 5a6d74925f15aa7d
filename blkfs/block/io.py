"""Request-path helpers shared by nodes and backends: in-flight tracking, drain, alignment.

Drain is how a graph change stays atomic for I/O (QEMU's bdrv_drained_begin, device-mapper's
suspend): while a :meth:`Tracker.drained` block runs, new requests wait at the door, and the
block only starts once the requests already inside have finished.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


class Tracker:
    """Counts requests in flight; :meth:`drained` holds new ones and waits for the rest."""

    __slots__ = ("in_flight", "_quiesced", "_idle", "_resume")

    def __init__(self) -> None:
        self.in_flight = 0
        self._quiesced = 0
        self._idle: trio.Event | None = None
        self._resume = trio.Event()

    async def enter(self) -> None:
        """Admit one request, waiting while the tracker is drained."""
        while self._quiesced:
            await self._resume.wait()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Run the body with no request in flight and new ones held until it ends."""
        if self._quiesced == 0:
            self._resume = trio.Event()
        self._quiesced += 1
        try:
            while self.in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
            self._idle = None
            yield
        finally:
            self._quiesced -= 1
            if self._quiesced == 0:
                self._resume.set()


class RangeLocks:
    """Exclusive byte ranges: a holder waits for every overlapping holder to finish (so a
    read-modify-write and a write into the same block never interleave)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, trio.Event]] = {}
        self._ids = 0

    @asynccontextmanager
    async def hold(self, offset: int, length: int) -> AsyncIterator[None]:
        end = offset + length
        while True:
            busy = next((done for start, stop, done in self._held.values()
                         if start < end and offset < stop), None)
            if busy is None:
                break
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
