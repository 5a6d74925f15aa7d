"""``blklogwrites``: logs every write, zero write, discard and flush that reaches the node
below, so that any state a power cut could have left can be rebuilt and checked afterwards
(QEMU's blklogwrites filter; Linux's dm-log-writes, replayed by xfstests and CrashMonkey).

The log (child ``log``) is in dm-log-writes format as QEMU writes it (reference: QEMU
block/blklogwrites.c, Linux drivers/md/dm-log-writes.c), so one replay tool reads both: a
super block in log sector 0, then per request one log sector holding its entry, followed by
the request's data in whole log sectors. Entries count in ``log-sector-size`` units, in the
log and in their ``sector``/``nr_sectors`` fields; every field is little-endian.

What a replay may rely on:

* A request is logged once the child has done it; one the child fails is not logged (QEMU
  logs it anyway, and would record a failed flush as a barrier that never happened).
* A flush entry takes its place in the log when the flush is sent to the child, and is
  written once the child's flush has returned; a request completing meanwhile is logged
  after it, since that flush may have missed it. So every request before a flush entry is
  durable at that flush. A failed flush leaves a mark entry (``flush failed``) in its place.
* Zero writes are logged as writes of zeros (flags 0), as QEMU does. A flush with nothing
  logged since the last flush entry is passed on but not logged, as QEMU's block layer drops
  such a flush before the driver sees it; so QEMU and blkfs log a workload alike.
* A write or zero write made with FUA is passed on with FUA and its entry carries the FUA
  flag, as dm-log-writes logs REQ_FUA: it was durable when logged. (QEMU's filter takes no
  FUA: its block layer writes, then flushes, and logs a flush entry after the write.)
* The super block is rewritten, and the log flushed, at every flush entry and every
  ``log-super-update-interval`` entries; also at close, so no entry is left uncounted.

Requests are aligned to the log sector (the layer read-modify-writes around writes; unaligned
zero writes are read-modify-written here, discards shrink to whole sectors). Truncation
passes through unlogged, as in QEMU: the log format has no entry for it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Mapping
from typing import Any

import trio

from blkfs.block import BlockDriver, BlockError, ChildSpec, Option, Role, WriteFlags

# reference: struct log_write_super, struct log_write_entry (dm-log-writes)
SUPER = struct.Struct("<QQQI")
"""magic, version, nr_entries, sectorsize"""
ENTRY = struct.Struct("<QQQQ")
"""sector, nr_sectors, flags, data_len"""
MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK
DEFAULT_SECTOR = 512
ZERO_CHUNK = 1 << 20


def _logged(flags: WriteFlags) -> int:
    """A write's entry flags: FUA for a write durable when done (dm-log-writes' REQ_FUA)."""
    return FUA if flags and flags & WriteFlags.FUA else 0


def sector_size_valid(size: int) -> bool:
    """QEMU's blk_log_writes_sector_size_valid: a power of two that holds an entry."""
    return size & (size - 1) == 0 and ENTRY.size <= size < 1 << 24


class BlklogwritesDriver(BlockDriver):
    name = "blklogwrites"
    is_filter = True
    options = {
        "log-sector-size": Option(
            "size",
            None,
            "log sector size, a power of two (default 512; taken from the log with log-append)",
        ),
        "log-append": Option(
            "bool", False, "append to the log in the log image instead of starting a new one"
        ),
        "log-super-update-interval": Option(
            "int",
            4096,
            "rewrite the super block (and flush the log) every this many entries",
            minimum=1,
        ),
    }
    children = {
        "file": ChildSpec(help="the node whose writes are logged"),
        "log": ChildSpec(help="the log image (dm-log-writes format)", role=Role.METADATA),
    }

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.file = self.child("file")
        self.log = self.child("log")
        size: int | None = values["log-sector-size"]
        self.entries = 0
        self.next_sector = 1
        if values["log-append"]:
            if size is not None:
                raise BlockError(
                    errno.EINVAL,
                    "blklogwrites: log-append and log-sector-size are mutually exclusive",
                )
            size = await self._find_end()
        elif size is None:
            size = DEFAULT_SECTOR
        if not sector_size_valid(size):
            raise BlockError(
                errno.EINVAL,
                f"blklogwrites: invalid log sector size {size} "
                f"(a power of two from {ENTRY.size} to 8M)",
            )
        self.sector_size = size
        self.bits = size.bit_length() - 1
        self.request_alignment = size
        self.interval = values["log-super-update-interval"]
        self.counted = self.entries
        """Entries the super block on disk counts."""
        self.dirty = False
        """Something was logged since the last flush entry."""
        self.super_lock = trio.Lock()
        self.zero_lock = trio.Lock()
        """Serialises this driver's read-modify-writes of partly zeroed sectors."""

    async def _find_end(self) -> int:
        """Read the super block and walk the entries it counts (QEMU's
        blk_log_writes_find_cur_log_sector); an empty log is a new one of 512-byte sectors."""
        if self.log.node.size == 0:
            return DEFAULT_SECTOR
        head = await self.log.read(0, min(SUPER.size, self.log.node.size))
        fields: tuple[int, int, int, int] = SUPER.unpack(bytes(head).ljust(SUPER.size, b"\0"))
        magic, version, entries, size = fields
        if magic != MAGIC:
            raise BlockError(errno.EINVAL, "blklogwrites: invalid log super block magic")
        if version != VERSION:
            raise BlockError(errno.EINVAL, f"blklogwrites: unsupported log version {version}")
        if not sector_size_valid(size):
            return size  # open() refuses it, naming it
        bits = size.bit_length() - 1
        sector = 1
        for index in range(entries):
            if (sector << bits) + ENTRY.size > self.log.node.size:
                raise BlockError(
                    errno.EINVAL, f"blklogwrites: the log ends before entry {index} of {entries}"
                )
            _, count, flags, _ = ENTRY.unpack(
                bytes(await self.log.read(sector << bits, ENTRY.size))
            )
            if flags & ~KNOWN_FLAGS:
                raise BlockError(
                    errno.EINVAL, f"blklogwrites: invalid flags {flags:#x} in log entry {index}"
                )
            sector += 1 if flags & DISCARD else 1 + count
        self.entries, self.next_sector = entries, sector
        return size

    async def close(self) -> None:
        if not self.node.read_only and self.entries != self.counted:
            await self._write_super(flush=True)

    # -- the log ------------------------------------------------------------------------

    def _reserve(self, data_sectors: int) -> int:
        """The log offset of a new entry with that much data; it takes its place in the log
        now (no await), so the log's order is the order requests completed in."""
        offset = self.next_sector << self.bits
        self.next_sector += 1 + data_sectors
        self.entries += 1
        self.dirty = True
        return offset

    def _entry(self, sector: int, count: int, flags: int, mark: bytes = b"") -> bytes:
        head = ENTRY.pack(sector, count, flags, len(mark)) + mark
        return head + bytes(self.sector_size - len(head))

    async def _append(
        self, offset: int, length: int, flags: int, data: memoryview | bytes | None = None
    ) -> None:
        """Log a request the child has done: ``data`` for a write, None for a zero write
        (logged as zeros) or a discard (logged without data)."""
        at = self._reserve(0 if flags & DISCARD else length >> self.bits)
        await self._put(at, offset, length, flags, data)

    async def _put(
        self,
        at: int,
        offset: int,
        length: int,
        flags: int,
        data: memoryview | bytes | bytearray | None,
    ) -> None:
        """Write an entry into the place :meth:`_reserve` gave it."""
        entry = self._entry(offset >> self.bits, length >> self.bits, flags)
        if data is not None:
            await self.log.write(at, entry + bytes(data))
        else:
            await self.log.write(at, entry)
            if not flags & DISCARD:
                await self._write_log_zeros(at + self.sector_size, length)
        await self._entry_done()

    async def _write_log_zeros(self, at: int, length: int) -> None:
        """Zeros written out, so the log holds every entry's data even at its end."""
        zeros = bytes(min(length, ZERO_CHUNK))
        end = at + length
        while at < end:
            chunk = min(end - at, len(zeros))
            await self.log.write(at, memoryview(zeros)[:chunk])
            at += chunk

    async def _entry_done(self) -> None:
        if self.entries % self.interval == 0:
            await self._write_super(flush=True)

    async def _write_super(self, flush: bool) -> None:
        async with self.super_lock:
            entries = self.entries
            head = SUPER.pack(MAGIC, VERSION, entries, self.sector_size)
            await self.log.write(0, head + bytes(self.sector_size - len(head)))
            if flush:
                await self.log.flush()
            self.counted = entries

    # -- data path ----------------------------------------------------------------------

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self.file.write(offset, data, flags)
        length = data.nbytes
        if (offset | length) & (self.sector_size - 1):
            await self._append_readback(offset, length, _logged(flags))
        else:
            await self._append(offset, length, _logged(flags), data)

    async def _append_readback(self, offset: int, length: int, flags: int) -> None:
        """Log an unaligned write (the layer's read-modify-write stops at the end of the
        file) as the whole sectors it touched, read back from the child: past the child's
        end they read as zeros, as a replay of the log will see them."""
        mask = self.sector_size - 1
        start, end = offset & ~mask, (offset + length + mask) & ~mask
        at = self._reserve((end - start) >> self.bits)  # its place before the read awaits
        sectors = bytearray(end - start)
        have = min(end, self.file.node.size) - start
        if have > 0:
            await self.file.readinto(start, memoryview(sectors)[:have])
        await self._put(at, start, end - start, flags, sectors)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        mask = self.sector_size - 1
        head, tail = (offset + mask) & ~mask, (offset + length) & ~mask
        if head >= tail:  # within one or two sectors: no whole sector to zero
            await self._zero_partial(offset, length, flags)
            return
        if head > offset:
            await self._zero_partial(offset, head - offset, flags)
        await self.file.write_zeroes(head, tail - head, unmap, flags)
        await self._append(head, tail - head, _logged(flags))
        if tail < offset + length:
            await self._zero_partial(tail, offset + length - tail, flags)

    async def _zero_partial(self, offset: int, length: int, flags: WriteFlags) -> None:
        """Zeros in part of a sector: read-modify-write, logged as a write."""
        mask = self.sector_size - 1
        start = offset & ~mask
        end = min((offset + length + mask) & ~mask, max(self.file.node.size, offset + length))
        async with self.zero_lock:
            merged = bytearray(end - start)
            have = min(end, self.file.node.size) - start
            if have > 0:
                await self.file.readinto(start, memoryview(merged)[:have])
            merged[offset - start : offset - start + length] = bytes(length)
            await self.write(start, memoryview(merged), flags)

    async def discard(self, offset: int, length: int) -> None:
        mask = self.sector_size - 1
        start, end = (offset + mask) & ~mask, (offset + length) & ~mask
        if start >= end:
            return  # discard is advisory: no whole sector, nothing to do
        await self.file.discard(start, end - start)
        await self._append(start, end - start, DISCARD)

    async def flush(self) -> None:
        if not self.dirty:
            await self.file.flush()
            return
        at = self._reserve(0)
        self.dirty = False
        try:
            await self.file.flush()
        except BaseException:
            self.dirty = True
            with trio.CancelScope(shield=True):
                await self.log.write(at, self._entry(0, 0, MARK, b"flush failed"))
                await self._entry_done()
            raise
        await self.log.write(at, self._entry(0, 0, FLUSH))
        await self._write_super(flush=True)

    def info(self) -> dict[str, Any]:
        return {"log-sector-size": self.sector_size, "log-entries": self.entries}
