"""Persistent dirty bitmaps in a qcow2 image, as QEMU keeps them (block/qcow2-bitmap.c).

Ground rules:

* Bitmaps are trusted only under autoclear bit 0 (the spec's "bitmaps extension is
  consistent"): without it an extension is stale and ignored (and dropped at the first
  change, :meth:`~.metadata.Metadata.clear_autoclear`).
* At a writable open every loaded bitmap gets the in-use flag on disk before anything else
  changes; a bitmap found in use at open missed writes (its image was not closed cleanly), so
  it is loaded as inconsistent: kept, stored back as it was, usable only to be removed.
* Storing (at close, or when the image turns read-only) writes new data clusters, bitmap
  tables and directory, makes them and their refcounts durable, then points the header at
  them, and only then frees the old ones: a crash at any point leaves either the old
  directory (in use: inconsistent) or the new one, at worst with leaked clusters.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Awaitable, Callable, Iterable

from blkfs.block import BlockError
from blkfs.block.dirty import DirtyBitmap

from . import bitmap_directory as directory
from .bitmap_directory import FLAG_AUTO, FLAG_IN_USE, StoredBitmap
from .mapping import corrupt
from .metadata import Metadata
from .ondisk import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    BitmapDirEntry,
    BitmapsExtension,
    FormatError,
    HeaderExtension,
    decode_table,
    encode_table,
)


def _extension(metadata: Metadata) -> BitmapsExtension | None:
    """The image's bitmaps extension, if the header vouches for it."""
    header = metadata.header
    if not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    found = [ext for ext in header.extensions if ext.type == EXT_BITMAPS]
    if not found:
        return None
    try:
        return BitmapsExtension.unpack(found[0].data)
    except FormatError as exc:
        raise corrupt(str(exc)) from None


def _check_place(metadata: Metadata, offset: int, length: int, what: str) -> None:
    cluster = metadata.header.cluster_size
    if offset % cluster or offset < cluster or offset + length > metadata.file.size:
        raise corrupt(f"{what} at {offset}+{length} is not inside the image")


class BitmapStore:
    """The image's bitmap directory as loaded, and the storing of a node's bitmaps."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self.stored: list[StoredBitmap] = []

    def rebind(self, metadata: Metadata) -> None:
        """The image's metadata was loaded again (reopened writable)."""
        self.metadata = metadata

    async def load(self, size: int) -> list[DirtyBitmap]:
        """The image's bitmaps for a node of ``size`` bytes; the ones found in use are
        inconsistent (and hold no bits)."""
        extension = _extension(self.metadata)
        if extension is None or not extension.nb_bitmaps:
            return []
        if extension.nb_bitmaps > directory.MAX_BITMAPS:
            raise corrupt(f"{extension.nb_bitmaps} bitmaps (at most {directory.MAX_BITMAPS})")
        length = extension.bitmap_directory_size
        if length > directory.MAX_DIRECTORY_SIZE:
            raise corrupt(f"bitmap directory of {length} bytes")
        _check_place(self.metadata, extension.bitmap_directory_offset, length, "bitmap directory")
        data = await self.metadata.file.read(extension.bitmap_directory_offset, length)
        try:
            self.stored = directory.parse(data, extension.nb_bitmaps)
        except FormatError as exc:
            raise corrupt(str(exc)) from None
        return [await self._bitmap(stored, size) for stored in self.stored]

    async def _bitmap(self, stored: StoredBitmap, size: int) -> DirtyBitmap:
        entry = stored.entry
        if entry.type != directory.TYPE_DIRTY_TRACKING or (
            entry.extra_data_size and not entry.flags & directory.FLAG_EXTRA_DATA_COMPATIBLE
        ):
            raise BlockError(
                errno.ENOTSUP, f"qcow2: bitmap '{stored.name}' is of a kind blkfs does not know"
            )
        if entry.flags & ~directory.FLAGS_KNOWN or not (
            directory.MIN_GRANULARITY_BITS
            <= entry.granularity_bits
            <= directory.MAX_GRANULARITY_BITS
        ):
            raise corrupt(f"bitmap '{stored.name}': bad flags or granularity")
        cluster = self.metadata.header.cluster_size
        if entry.bitmap_table_size != directory.table_size(size, stored.granularity, cluster):
            raise corrupt(f"bitmap '{stored.name}': its table does not fit the image's size")
        enabled = bool(entry.flags & FLAG_AUTO)
        if entry.flags & FLAG_IN_USE:
            return DirtyBitmap(
                stored.name,
                size,
                stored.granularity,
                persistent=True,
                enabled=enabled,
                inconsistent=True,
            )
        bits = bytearray()
        for host in await self._table(stored):
            offset = host & BitmapDirEntry.TABLE_OFFSET_MASK
            if offset:
                _check_place(self.metadata, offset, cluster, f"bitmap '{stored.name}' data")
                bits += await self.metadata.file.read(offset, cluster)
            else:
                fill = 0xFF if host & directory.TABLE_ALL_ONES else 0
                bits += bytes([fill]) * cluster
        return DirtyBitmap(
            stored.name, size, stored.granularity, persistent=True, enabled=enabled, bits=bits
        )

    async def _table(self, stored: StoredBitmap) -> array[int]:
        length = stored.entry.bitmap_table_size * 8
        if not length:
            return array("Q")
        offset = stored.entry.bitmap_table_offset
        _check_place(self.metadata, offset, length, f"bitmap '{stored.name}' table")
        return decode_table(await self.metadata.file.read(offset, length))

    async def mark_in_use(self) -> None:
        """Before the first change of a writable image: every bitmap in use, on disk (the
        directory rewritten in place, its size unchanged)."""
        extension = _extension(self.metadata)
        if extension is None or not self.stored:
            return
        self.stored = [s.with_flags(s.entry.flags | FLAG_IN_USE) for s in self.stored]
        await self.metadata.file.write(
            extension.bitmap_directory_offset, directory.pack(self.stored)
        )
        await self.metadata.file.flush()

    async def _clusters(self, stored: StoredBitmap) -> list[int]:
        """The host clusters a stored bitmap's table and data take."""
        cluster = self.metadata.header.cluster_size
        entry = stored.entry
        hosts = [
            entry.bitmap_table_offset + i * cluster
            for i in range(-(-entry.bitmap_table_size * 8 // cluster))
        ]
        hosts += [
            host & BitmapDirEntry.TABLE_OFFSET_MASK
            for host in await self._table(stored)
            if host & BitmapDirEntry.TABLE_OFFSET_MASK
        ]
        return hosts

    async def _write_new(self, data: bytes | bytearray) -> int:
        """``data`` in new clusters (zero-padded to whole ones); their first offset."""
        cluster = self.metadata.header.cluster_size
        host = await self.metadata.allocator.allocate(-(-len(data) // cluster))
        await self.metadata.file.write(host, bytes(data) + bytes(-len(data) % cluster))
        return host

    async def _store_one(self, bitmap: DirtyBitmap, in_use: bool) -> StoredBitmap:
        cluster = self.metadata.header.cluster_size
        table = array("Q")
        for start in range(0, len(bitmap.bits), cluster):
            part = bitmap.bits[start : start + cluster]
            table.append(await self._write_new(part) if any(part) else 0)
        host = await self._write_new(encode_table(table)) if table else 0
        entry = directory.new_entry(
            bitmap.name, host, len(table), bitmap.granularity, bitmap.enabled
        )
        return entry.with_flags(entry.entry.flags | FLAG_IN_USE) if in_use else entry

    async def store(
        self,
        bitmaps: Iterable[DirtyBitmap],
        write_back: Callable[[], Awaitable[bool]],
        in_use: bool = False,
    ) -> None:
        """Store the persistent ones of ``bitmaps`` (lock held), in the order of the ground
        rules, ``in_use`` if the image stays open writable; ``write_back`` is the driver's
        (metadata, then freed clusters released)."""
        persistent = [b for b in bitmaps if b.persistent]
        if not persistent and not self.stored:
            return
        old = {s.name: s for s in self.stored}
        entries: list[StoredBitmap] = []
        kept: set[str] = set()
        for bitmap in persistent:
            if bitmap.inconsistent and bitmap.name in old:
                entries.append(old[bitmap.name])  # as it was, in use
                kept.add(bitmap.name)
            elif not bitmap.inconsistent:
                entries.append(await self._store_one(bitmap, in_use))
        packed = directory.pack(entries)
        place = await self._write_new(packed) if entries else 0
        if not await write_back():
            await self.metadata.file.flush()
        freed = await self._old_clusters(kept)
        await self._point_header(len(entries), len(packed), place)
        self.stored = entries
        self.metadata.allocator.drop(freed)
        await write_back()

    async def _old_clusters(self, kept: set[str]) -> list[int]:
        """The clusters of the directory as loaded, but for those of the bitmaps ``kept``:
        none if any of it is out of bounds or shared (they are then leaked, not freed)."""
        found = [ext for ext in self.metadata.header.extensions if ext.type == EXT_BITMAPS]
        if _extension(self.metadata) is None or len(found) != 1:
            return []
        every = await self.metadata.bitmap_clusters(found[0])
        try:
            keep = {h for s in self.stored if s.name in kept for h in await self._clusters(s)}
        except BlockError:
            return []
        return [host for host in every if host not in keep]

    async def _point_header(self, count: int, size: int, place: int) -> None:
        """The header names the new directory (or none), durably."""
        header = self.metadata.header
        others = [ext for ext in header.extensions if ext.type != EXT_BITMAPS]
        kept, kept_bits = header.extensions, header.autoclear_features
        if count:
            data = BitmapsExtension(count, 0, size, place).pack()
            header.extensions = [*others, HeaderExtension(EXT_BITMAPS, data)]
            header.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            header.extensions = others
            header.autoclear_features &= ~AUTOCLEAR_BITMAPS
        head = header.pack_cluster()
        if head is None:
            header.extensions, header.autoclear_features = kept, kept_bits
            raise BlockError(errno.ENOSPC, "qcow2: the bitmaps extension does not fit the header")
        await self.metadata.file.write(0, head)
        await self.metadata.file.flush()
