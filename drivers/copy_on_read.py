"""``copy-on-read``: data read from a backing file is also written to the top image, so the
next read of it is local (QEMU's copy-on-read filter; dm-clone's hydration).

The filter sits on the top format node (``file`` child). After a read, the ranges the top
image does not hold itself (block_status without ALLOCATED, but with data from below) are
written to it with the bytes just read. A copy-up and a write to an overlapping range never
run at once, so a copy-up cannot bring back stale data over a newer write.
"""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping

import trio

from blkfs.block import BlockDriver, BlockError, ChildSpec, Status


class RangeLocks:
    """Exclusive byte ranges: a holder waits for every overlapping holder to finish."""

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


class CopyOnReadDriver(BlockDriver):
    name = "copy-on-read"
    is_filter = True
    children = {"file": ChildSpec(help="the top image, which receives the copied data")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        if values["read-only"]:
            raise BlockError(errno.EINVAL, "copy-on-read: the node must be writable (it writes "
                                           "what it reads into the top image)")
        self.locks = RangeLocks()
        self.copied_bytes = 0
        self.copy_ups = 0

    async def read(self, offset: int, buf: memoryview) -> None:
        length = buf.nbytes
        from_below = await self._from_below(offset, length)
        if not from_below:
            await self.filtered.readinto(offset, buf)
            return
        async with self.locks.hold(offset, length):
            await self.filtered.readinto(offset, buf)
            for start, span in await self._from_below(offset, length):
                await self.filtered.write(start, buf[start - offset:start - offset + span])
                self.copied_bytes += span
                self.copy_ups += 1

    async def _from_below(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) pieces of the range whose data comes from a backing file."""
        pieces = []
        position, end = offset, offset + length
        while position < end:
            extent = await self.filtered.block_status(position, end - position)
            if Status.DATA in extent.status and Status.ALLOCATED not in extent.status:
                if pieces and pieces[-1][0] + pieces[-1][1] == position:
                    pieces[-1] = (pieces[-1][0], pieces[-1][1] + extent.length)
                else:
                    pieces.append((position, extent.length))
            position += extent.length
        return pieces

    async def write(self, offset: int, data: memoryview) -> None:
        async with self.locks.hold(offset, data.nbytes):
            await self.filtered.write(offset, data)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        async with self.locks.hold(offset, length):
            await self.filtered.write_zeroes(offset, length, unmap)

    async def discard(self, offset: int, length: int) -> None:
        async with self.locks.hold(offset, length):
            await self.filtered.discard(offset, length)

    def info(self) -> dict[str, Any]:
        return {"copied-bytes": self.copied_bytes, "copy-ups": self.copy_ups}
