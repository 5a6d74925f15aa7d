"""``copy-on-read``: data read from a backing file is also written to the top image, so the
next read of it is local (QEMU's copy-on-read filter; dm-clone's hydration).

The filter sits on the top format node (``file`` child). After a read, the ranges the top
image does not hold itself but some image of its backing chain holds as data (block_status:
DATA without ALLOCATED, as a format reports what it leaves to its backing file) are written
to it with the bytes just read; ranges that read as zeros in the whole chain stay
unallocated, so a sparse image stays sparse. A copy-up and a write to an
overlapping range never run at once, so a copy-up cannot bring back stale data over a newer
write.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any

from blkfs.block import (
    BlockDriver,
    BlockError,
    Child,
    ChildSpec,
    Perm,
    RangeLocks,
    Status,
    WriteFlags,
)


class CopyOnReadDriver(BlockDriver):
    name = "copy-on-read"
    is_filter = True
    children = {"file": ChildSpec(help="the top image, which receives the copied data")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        if values["read-only"]:
            raise BlockError(
                errno.EINVAL,
                "copy-on-read: the node must be writable (it writes "
                "what it reads into the top image)",
            )
        self.locks = RangeLocks()
        self.copied_bytes = 0
        self.copy_ups = 0

    async def reopen(self, values: Mapping[str, Any]) -> None:
        if values["read-only"]:
            raise BlockError(
                errno.EINVAL,
                "copy-on-read: the node must stay writable (it "
                "writes what it reads into the top image)",
            )
        await super().reopen(values)

    async def read(self, offset: int, buf: memoryview) -> None:
        length = buf.nbytes
        from_below = await self._from_below(offset, length)
        if not from_below:
            await self.filtered.readinto(offset, buf)
            return
        async with self.locks.hold(offset, length):
            await self.filtered.readinto(offset, buf)
            for start, span in await self._from_below(offset, length):
                await self.filtered.write(start, buf[start - offset : start - offset + span])
                self.copied_bytes += span
                self.copy_ups += 1

    async def _from_below(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The (offset, length) pieces of the range whose data comes from a backing file."""
        pieces: list[tuple[int, int]] = []
        position, end = offset, offset + length
        while position < end:
            extent = await self.filtered.block_status(position, end - position)
            if Status.ALLOCATED not in extent.status and Status.DATA in extent.status:
                if pieces and pieces[-1][0] + pieces[-1][1] == position:
                    pieces[-1] = (pieces[-1][0], pieces[-1][1] + extent.length)
                else:
                    pieces.append((position, extent.length))
            position += extent.length
        return pieces

    def child_perm(
        self, child: Child, writable: bool, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm]:
        """Its parents' needs, and writing unchanged data, which is what a copy-up does, while
        the node may write (reference: cor_child_perm)."""
        passthrough = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
        return (perm & passthrough) | (Perm.WRITE_UNCHANGED if writable else Perm(0)), shared

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        async with self.locks.hold(offset, data.nbytes):
            await self.filtered.write(offset, data, flags)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        async with self.locks.hold(offset, length):
            await self.filtered.write_zeroes(offset, length, unmap, flags)

    async def discard(self, offset: int, length: int) -> None:
        async with self.locks.hold(offset, length):
            await self.filtered.discard(offset, length)

    def info(self) -> dict[str, Any]:
        return {"copied-bytes": self.copied_bytes, "copy-ups": self.copy_ups}
