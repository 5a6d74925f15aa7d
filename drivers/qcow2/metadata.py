"""An open image's metadata in memory: loaded and checked at open, written back in one order.

Ground rules:

* :meth:`Metadata.load` reads the header and the L1 and refcount tables, and refuses what
  blkfs cannot open (QEMU's qcow2_do_open): encryption, unknown incompatible features, tables
  out of bounds, and, for writing, an image marked corrupt or dirty.
* The write-back order (docs/design.md, "Crash safety") is declared here, once, as the
  dependencies of the metadata kinds (:mod:`blkfs_drivers.qcow2.cache`): refcount blocks, then the
  refcount table that names them, then the L2 tables that use the clusters they count (after
  a barrier even when no refcount changed: guest data in new clusters comes first), then the
  L1 entries that name new L2 tables, then the refcount decreases of clusters those no longer
  reference; a barrier between each, and one at the end.
* blkfs maintains autoclear bit 0 (persistent dirty bitmaps,
  :mod:`blkfs_drivers.qcow2.bitmap_store`) and no other autoclear feature: a writable image
  clears the others, durably, before its first change (:meth:`Metadata.clear_autoclear`), as
  the spec requires of such a program.
"""

from __future__ import annotations

import errno
from array import array

from blkfs.block import BlockError

from .cache import Barrier, CachedTables, L1Table, RefcountTable
from .imagefile import ImageFile, read_header
from .mapping import OFFSET_MASK, Geometry, corrupt
from .ondisk import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_OFFSET,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_KNOWN,
    INCOMPAT_NAMES,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    BitmapDirEntry,
    BitmapsExtension,
    Feature,
    FormatError,
    Header,
    HeaderExtension,
    decode_table,
    encode_entry,
    encode_table,
)
from .refcount import DeferredDecreases, RefcountAllocator

MAINTAINED_AUTOCLEAR = AUTOCLEAR_BITMAPS
"""The autoclear bits a writable open keeps: what they vouch for, blkfs maintains."""


def _refcount_block(data: bytes | bytearray) -> bytearray:
    """A refcount block is kept as the bytes it is on disk (refcounts are packed in place)."""
    return data if isinstance(data, bytearray) else bytearray(data)


def _as_is(block: bytearray) -> bytearray:
    return block


class Metadata:
    """The header, the tables and caches, the allocator, and their write-back order."""

    def __init__(
        self,
        file: ImageFile,
        header: Header,
        l1: array[int],
        reftable: array[int],
        l2_cache_size: int,
        refcount_cache_size: int,
    ) -> None:
        self.file = file
        self.header = header
        self.geometry = Geometry(header.cluster_bits, header.extended_l2)
        cluster = header.cluster_size
        self.barrier = barrier = Barrier(file)
        # The write-back order, declared once: each kind names what it waits for.
        self.refcount_blocks: CachedTables[bytearray] = CachedTables(
            barrier, file, refcount_cache_size // cluster, cluster, _refcount_block, _as_is
        )
        self.refcount_table = RefcountTable(
            barrier, file, header, reftable, depends_on=self.refcount_blocks
        )
        self.l2_tables: CachedTables[array[int]] = CachedTables(
            barrier,
            file,
            l2_cache_size // cluster,
            cluster,
            decode_table,
            encode_table,
            depends_on=self.refcount_table,
            depends_on_flush=True,
        )
        self.l1_table = L1Table(barrier, file, header, l1, depends_on=self.l2_tables)
        self.allocator = RefcountAllocator(
            file, header, self.refcount_table, self.refcount_blocks, barrier
        )
        self.decreases = DeferredDecreases(barrier, self.allocator, depends_on=self.l1_table)
        """The last kind: every other one comes before it."""

    @classmethod
    async def load(
        cls, file: ImageFile, writable: bool, l2_cache_size: int, refcount_cache_size: int
    ) -> Metadata:
        """The metadata of the image in ``file``, with empty caches."""
        header, _ = await read_header(file)
        check_features(header, writable)
        geometry = Geometry(header.cluster_bits, header.extended_l2)
        l1 = await _load_l1(file, header, geometry)
        reftable = await _load_reftable(file, header, geometry, writable)
        return cls(file, header, l1, reftable, l2_cache_size, refcount_cache_size)

    def pending(self) -> bool:
        return any(kind.pending() for kind in self.barrier.kinds)

    async def write_back(self) -> bool:
        """Everything cached reaches the image in the declared order (lock held). True if
        anything did, which ends with a flush of the image file."""
        if not self.pending():
            return False
        await self.decreases.write_back()
        await self.barrier()
        return True

    async def clear_autoclear(self) -> None:
        """Clear the autoclear feature bits blkfs does not maintain before the image's
        first change (lock held): on disk, behind a barrier, before anything else is
        written, so no crash leaves a change beside a structure that claims to have recorded
        it. A bitmaps extension the header does not vouch for is stale: it goes from the
        header, as QEMU drops it, and its clusters are freed with the next write-back (QEMU
        leaves them leaked)."""
        header = self.header
        maintained = header.autoclear_features & MAINTAINED_AUTOCLEAR
        await self.file.write(AUTOCLEAR_OFFSET, encode_entry(maintained))
        await self.file.flush()
        header.autoclear_features = maintained  # only now: in-place writes wait till then
        stale = [e for e in header.extensions if e.type == EXT_BITMAPS and not maintained]
        if not stale:
            return
        clusters = await self.bitmap_clusters(stale[0]) if len(stale) == 1 else []
        kept = header.extensions
        header.extensions = [ext for ext in kept if ext.type != EXT_BITMAPS]
        head = header.pack_cluster()
        if head is None:  # cannot be (the header only shrank): keep the extension
            header.extensions = kept
            return
        await self.file.write(0, head)
        await self.file.flush()
        self.allocator.drop(clusters)

    async def bitmap_clusters(self, extension: HeaderExtension) -> list[int]:
        """The host clusters of the bitmaps (directory, tables, data), each once; none if
        anything about them is out of bounds or a refcount is not 1: they are then left
        leaked rather than freed while something else may use them."""
        try:
            bitmaps = BitmapsExtension.unpack(extension.data)
        except FormatError:
            return []
        cluster = self.header.cluster_size
        found: set[int] = set()

        def take(offset: int, length: int) -> bool:
            if not length:
                return True
            if offset % cluster or offset < cluster or offset + length > self.file.size:
                return False
            found.update(range(offset, offset + length, cluster))
            return True

        size = bitmaps.bitmap_directory_size
        if size > 64 << 20 or not take(bitmaps.bitmap_directory_offset, size):
            return []
        directory = await self.file.read(bitmaps.bitmap_directory_offset, size) if size else b""
        position = 0
        for _ in range(bitmaps.nb_bitmaps):
            try:
                entry = BitmapDirEntry.unpack(directory, position)
            except FormatError:
                return []
            position += entry.entry_size
            offset, length = entry.bitmap_table_offset, entry.bitmap_table_size * 8
            if length > MAX_L1_BYTES or not take(offset, length):
                return []
            for data in decode_table(await self.file.read(offset, length) if length else b""):
                host = data & BitmapDirEntry.TABLE_OFFSET_MASK
                if host and not take(host, cluster):
                    return []
        if found & self._known_metadata():
            return []
        for host in sorted(found):
            if await self.allocator.refcount(host) != 1:
                return []
        return sorted(found)

    def _known_metadata(self) -> set[int]:
        """Host clusters of the metadata known without a walk: the L1 table, the L2 tables
        it names, the refcount table and blocks."""
        header, cluster = self.header, self.header.cluster_size
        known = set(
            range(header.l1_table_offset, header.l1_table_offset + header.l1_size * 8, cluster)
        )
        known.update(
            range(
                header.refcount_table_offset,
                header.refcount_table_offset + header.refcount_table_clusters * cluster,
                cluster,
            )
        )
        known.update(entry & OFFSET_MASK for entry in self.l1_table.entries)
        known.update(entry & OFFSET_MASK for entry in self.refcount_table.entries)
        return known


def check_features(header: Header, writable: bool) -> None:
    """Refuse what blkfs cannot open, or cannot open for writing, with a message naming it."""
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if header.crypt_method:
        raise BlockError(errno.ENOTSUP, "qcow2: encrypted images are not supported")
    if unknown:
        names = [
            header.feature_names.get(
                (Feature.INCOMPATIBLE, bit), INCOMPAT_NAMES.get(bit, f"bit {bit}")
            )
            for bit in range(64)
            if unknown >> bit & 1
        ]
        raise BlockError(
            errno.ENOTSUP, "qcow2: unsupported incompatible features: " + ", ".join(names)
        )
    if writable and header.incompatible_features & INCOMPAT_CORRUPT:
        raise BlockError(
            errno.EROFS,
            "qcow2: the image is marked corrupt; open it "
            "read-only, or repair it with qemu-img check -r all",
        )
    if writable and header.incompatible_features & INCOMPAT_DIRTY:
        raise BlockError(
            errno.EROFS,
            "qcow2: the image was not closed cleanly (dirty "
            "bit of lazy refcounts); open it read-only, or "
            "repair it with qemu-img check -r all",
        )
    if header.size > 1 << 61:
        raise BlockError(errno.EINVAL, f"qcow2: virtual size {header.size} is too large")


def _check_in_file(file: ImageFile, offset: int, length: int, what: str) -> None:
    if offset + length > file.size:
        raise corrupt(f"{what} at {offset}+{length} lies past the end of the file")


async def _load_l1(file: ImageFile, header: Header, geometry: Geometry) -> array[int]:
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise corrupt(f"L1 table of {header.l1_size} entries is too large")
    if header.l1_size < geometry.l1_size_for(header.size):
        raise corrupt(f"L1 table of {header.l1_size} entries cannot map {header.size} bytes")
    if not header.l1_size:
        return array("Q")
    geometry.check_cluster(header.l1_table_offset, "L1 table")
    _check_in_file(file, header.l1_table_offset, header.l1_size * 8, "L1 table")
    return decode_table(await file.read(header.l1_table_offset, header.l1_size * 8))


async def _load_reftable(
    file: ImageFile, header: Header, geometry: Geometry, writable: bool
) -> array[int]:
    """The refcount table, checked; for a writable image its entries up to the last used
    one (the rest are zeros, on disk and so in memory: see RefcountTable), for a read-only
    one none, since it never allocates (reopening writable loads the image again). QEMU
    holds the whole table, a cluster (64 KiB) per image and per backing file of each."""
    length = header.refcount_table_clusters * header.cluster_size
    if not length or length > MAX_REFTABLE_BYTES:
        raise corrupt(f"refcount table of {header.refcount_table_clusters} clusters")
    geometry.check_cluster(header.refcount_table_offset, "refcount table")
    _check_in_file(file, header.refcount_table_offset, length, "refcount table")
    if not writable:
        return array("Q")
    table = decode_table(await file.read(header.refcount_table_offset, length))
    used = len(table)
    while used and not table[used - 1]:
        used -= 1
    del table[used:]
    return table
