"""The qcow2 driver's changes of the image as a whole: emptying it (rollback), naming a new
backing file (snapshots), and growing it."""

from __future__ import annotations

import errno
from array import array
from dataclasses import replace

from blkfs.block import BlockError

from .imagefile import write_header
from .mapping import OFFSET_MASK, host_clusters
from .ondisk import MAX_BACKING_NAME, MAX_L1_BYTES
from .writes import WritableImage


class ImageChanges(WritableImage):
    """Emptying, a new backing file, growth."""

    async def make_empty(self) -> None:
        """Every guest cluster becomes unallocated, its host cluster freed, so the image
        shows its backing file again (QEMU's qcow2_make_empty with full discard; the L2
        tables stay). The freeing follows the usual barrier: L2 tables first."""
        if self.node.read_only:  # before anything changes, even in memory
            raise BlockError(errno.EROFS, f"node '{self.node.name}' is read-only")
        step = 2 if self.geometry.extended_l2 else 1  # an entry, and its bitmap if extended
        async with self._settled(0, self.header.size):
            await self._changing()
            for l1_index, entry in enumerate(self.l1):
                if not entry & OFFSET_MASK:
                    continue
                table_offset, table = await self._l2_for_write(l1_index)
                for old in table[::step]:
                    if old:
                        self.allocator.drop(host_clusters(self.geometry, old))
                table[:] = array("Q", bytes(table.itemsize * len(table)))
                self.l2_cache.mark_dirty(table_offset)
                self._locations_changed()
            await self._write_back()
            await self.file.flush()

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the first cluster naming the new backing file (QEMU's
        qcow2_change_backing_file); extensions blkfs does not know are kept."""
        if name is not None and len(name.encode()) > MAX_BACKING_NAME:
            raise BlockError(
                errno.ENAMETOOLONG,
                f"qcow2: a backing file name is at most {MAX_BACKING_NAME} bytes",
            )
        async with self.lock:
            trial = replace(self.header)
            trial.set_backing(name, fmt)
            if trial.pack_cluster() is None:
                raise BlockError(
                    errno.ENAMETOOLONG,
                    "qcow2: the backing file name does not fit in the first cluster",
                )
            await self._changing()
            self.header.set_backing(name, fmt)
            head = self.header.pack_cluster()
            assert head is not None  # what _changing drops only makes room
            if not await self._write_back():  # what the new backing file covers is
                await self.file.flush()  # durable before the header names it
            await self.file.write(0, memoryview(head))
            await self.file.flush()

    # -- growing ----------------------------------------------------------------------------

    async def truncate(self, length: int) -> None:
        if length < self.header.size:
            raise BlockError(errno.ENOTSUP, "qcow2: images can grow but not shrink")
        async with self.lock:
            await self._changing()
            needed = self.geometry.l1_size_for(length)
            if needed > len(self.l1):
                await self._grow_l1(needed)
            self.header.size = length
            self._locations_changed()
            await self._write_back()
            await write_header(self.metadata.file, self.header)

    async def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place at the end (QEMU's qcow2_grow_l1_table):
        everything cached written back first, the new table durable before the header names
        it, and the old table's clusters freed after."""
        cluster = self.cluster_size
        if entries * 8 > MAX_L1_BYTES:
            raise BlockError(errno.EFBIG, "qcow2: the L1 table would exceed its limit")
        old_offset, old_size = self.header.l1_table_offset, len(self.l1)
        host = await self.allocator.allocate(-(-entries * 8 // cluster))
        self.l1.extend([0] * (entries - len(self.l1)))
        await self._write_back()
        await self.l1_table.move(host)
        await write_header(self.metadata.file, self.header)
        for i in range(-(-old_size * 8 // cluster)):
            await self.allocator.update_refcount(old_offset + i * cluster, -1)
