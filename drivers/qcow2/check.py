"""Checking qcow2 metadata and repairing leaked clusters (``qemu-img check [-r leaks]``).

Ground rules:

* The walk counts every reference to a host cluster: the header, the active and snapshot L1
  tables, their L2 tables, data, zero-allocated and compressed clusters, the refcount table
  and blocks, the snapshot table, the bitmap directory and tables, the crypto header. It
  compares the counts with the stored refcounts (reference: QEMU block/qcow2-refcount.c,
  ``qcow2_check_refcounts``). A stored refcount above the count is a *leak*: space is wasted,
  nothing else. A refcount below the count (0 for a referenced cluster included), a reference
  past the end of the file or into metadata, a misaligned entry, or a COPIED flag that does
  not match the count is a *corruption*.
* The arithmetic is pure (:class:`Tally`, :func:`compare_block`), tested with plain values;
  :func:`check` does the reads, and with ``repair`` the writes.
* Repair lowers leaked refcounts to the count, and only on an image with no corruption and
  no check error. Every refcount it writes is still at least the number of references, so a
  crash (or a torn refcount block) part-way leaves at worst fewer leaks. The refcount blocks
  are written, then flushed, then the space of clusters no longer referenced goes back to
  the host (hole punching), as QEMU's repair discards them.
* Memory: a 32-bit counter and a flag byte per host cluster of the file, and one table at a
  time. Messages are capped; counts are exact.
* It runs when asked: ``blkfs image check``, and a writable open with ``repair=leaks``
  (:func:`repair_on_open`), as QEMU checks an image at open only when told to repair it.
"""

from __future__ import annotations

import errno
import logging
from array import array
from dataclasses import dataclass, field
from typing import Any

from blkfs.block import BlockError, Child

from .imagefile import ChildFile, ImageFile, read_header
from .mapping import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, SUBCLUSTERS, Geometry
from .ondisk import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    EXT_CRYPTO,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    BitmapDirEntry,
    BitmapsExtension,
    CryptoExtension,
    Header,
    SnapshotHeader,
    decode_table,
    get_refcount,
    refcount_entries,
    set_refcount,
)

log = logging.getLogger("blkfs.qcow2")

MAX_MESSAGES = 100
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # of a refcount table entry (spec: "Refcount table")

# Per-cluster flags, beside the counts.
ACTIVE_COPIED = 1  # an active L2 entry with OFLAG_COPIED points here
ACTIVE_SHARED = 2  # an active L2 entry without OFLAG_COPIED points here
DATA = 4  # guest data (of any L2 table) lives here


@dataclass
class CheckResult:
    """What a check found, with ``qemu-img check --output=json``'s names in :meth:`as_dict`."""

    corruptions: int = 0
    leaks: int = 0
    leaks_fixed: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    messages: list[str] = field(default_factory=list)
    dropped_messages: int = 0

    def say(self, message: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)
        else:
            self.dropped_messages += 1

    def corrupt(self, message: str) -> None:
        self.corruptions += 1
        self.say(f"ERROR {message}")

    def failed(self, message: str) -> None:
        self.check_errors += 1
        self.say(f"ERROR {message}")

    @property
    def clean(self) -> bool:
        return not (self.corruptions or self.leaks or self.check_errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "check-errors": self.check_errors,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "compressed-clusters": self.compressed_clusters,
            "image-end-offset": self.image_end_offset,
            "messages": self.messages
            + ([f"... and {self.dropped_messages} more"] if self.dropped_messages else []),
        }


class Tally:
    """Computed references per host cluster of a file of ``file_size`` bytes (pure).

    A reference that starts a whole cluster or more past the end of the file is a
    corruption and is not counted (QEMU's ``qcow2_inc_refcounts_imrt``: the last cluster may
    be partly allocated).
    """

    def __init__(self, cluster_bits: int, file_size: int, result: CheckResult) -> None:
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.file_size = file_size
        self.result = result
        slots = -(-file_size // self.cluster_size) + 1
        self.counts = array("I", bytes(4 * slots))
        self.flags = bytearray(slots)
        self.roles: dict[int, str] = {}
        """Metadata clusters and what they hold (an L2 table may be shared by snapshots)."""
        self.stored: dict[int, int] = {}
        """Stored refcounts that differ from the count, by cluster."""

    def add(self, offset: int, length: int, what: str) -> bool:
        """Count one reference to every cluster of [offset, offset + length); False (and a
        corruption) if the range lies past the end of the file."""
        if length <= 0:
            return True
        if offset + length - self.file_size >= self.cluster_size:
            self.result.corrupt(
                f"{what} at offset {offset:#x}+{length:#x} lies past the end "
                f"of the file ({self.file_size:#x})"
            )
            return False
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            if self.counts[cluster] == 0xFFFFFFFF:
                self.result.corrupt(f"cluster {cluster} is referenced over 2^32 times")
                continue
            self.counts[cluster] += 1
        return True

    def metadata(self, offset: int, length: int, what: str) -> bool:
        """Count a metadata structure; a cluster holding two kinds of metadata (or one
        structure twice, except L2 tables that snapshots share) is a corruption."""
        if not self.add(offset, length, what):
            return False
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            seen = self.roles.get(cluster)
            if seen is None:
                self.roles[cluster] = what
            elif seen != what or what != "L2 table":
                self.result.corrupt(
                    f"cluster {cluster} holds both the {seen} and the {what} (overlapping metadata)"
                )
        return True

    def l2_table(self, table: array[int], geometry: Geometry, active: bool) -> None:
        """Count the clusters one L2 table references and check its entries' form."""
        extended = geometry.extended_l2
        step = 2 if extended else 1
        cluster_mask = self.cluster_size - 1
        result = self.result
        for position in range(0, len(table), step):
            entry = table[position]
            bitmap = table[position + 1] if extended else 0
            if not entry and not bitmap:
                continue
            if entry & OFLAG_COMPRESSED:
                if entry & OFLAG_COPIED:
                    result.corrupt(f"compressed L2 entry {entry:#x} has the COPIED flag")
                if extended and bitmap:
                    result.corrupt(
                        f"compressed L2 entry {entry:#x} has a subcluster bitmap {bitmap:#x}"
                    )
                host, length = geometry.compressed_range(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED))
                if self.add(host, length, "compressed cluster"):
                    self._mark(host, length, DATA)
                if active:
                    result.allocated_clusters += 1
                    result.compressed_clusters += 1
                continue
            host = entry & OFFSET_MASK
            if extended and not host and bitmap & ((1 << SUBCLUSTERS) - 1):
                result.corrupt(
                    f"L2 entry {entry:#x} marks subclusters allocated "
                    f"(bitmap {bitmap:#x}) but has no host cluster"
                )
            if extended and bitmap & (bitmap >> SUBCLUSTERS) & ((1 << SUBCLUSTERS) - 1):
                result.corrupt(
                    f"L2 entry {entry:#x}: subclusters both allocated and zero (bitmap {bitmap:#x})"
                )
            if not host:
                continue
            if host & cluster_mask:
                result.corrupt(f"L2 entry {entry:#x}: host offset {host:#x} is not cluster aligned")
                continue
            if self.add(host, self.cluster_size, "data cluster"):
                flag = DATA
                if active:
                    flag |= ACTIVE_COPIED if entry & OFLAG_COPIED else ACTIVE_SHARED
                    result.allocated_clusters += 1
                self._mark(host, self.cluster_size, flag)

    def _mark(self, offset: int, length: int, flag: int) -> None:
        for cluster in range(
            offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1
        ):
            self.flags[cluster] |= flag

    def count(self, cluster: int) -> int:
        return self.counts[cluster] if cluster < len(self.counts) else 0

    def refcount(self, cluster: int, leaks_repaired: bool) -> int:
        """The stored refcount, or the count where a leak was (or will be) repaired."""
        stored = self.stored.get(cluster)
        if stored is None or (leaks_repaired and stored > self.count(cluster)):
            return self.count(cluster)
        return stored

    def finish(self, l1_copied: list[tuple[int, int, bool]], leaks_repaired: bool) -> None:
        """Checks that need every refcount compared: data in metadata clusters, and COPIED
        flags, set exactly where the refcount is 1 (the stored one, as QEMU compares, or the
        repaired one), for the active L1 and L2 tables."""
        result = self.result
        refcount = self.refcount
        for cluster, what in sorted(self.roles.items()):
            if self.flags[cluster] & DATA:
                result.corrupt(f"cluster {cluster} holds the {what} and guest data (overlapping)")
        for index, cluster, copied in l1_copied:
            count = refcount(cluster, leaks_repaired)
            if copied != (count == 1):
                result.corrupt(
                    f"OFLAG_COPIED L2 cluster: l1_index={index} refcount={count} copied={copied}"
                )
        for cluster, flags in enumerate(self.flags):
            if not flags & (ACTIVE_COPIED | ACTIVE_SHARED):
                continue
            count = refcount(cluster, leaks_repaired)
            if flags & ACTIVE_COPIED and count != 1:
                result.corrupt(f"OFLAG_COPIED data cluster {cluster}: set, refcount={count}")
            if flags & ACTIVE_SHARED and count == 1:
                result.corrupt(f"OFLAG_COPIED data cluster {cluster}: clear, refcount=1")


def compare_block(
    block: bytes | bytearray,
    first_cluster: int,
    tally: Tally,
    refcount_order: int,
    result: CheckResult,
) -> tuple[bytearray | None, list[int]]:
    """Compare one refcount block with the tally; count leaks and corruptions (pure).

    Returns the block with every leaked refcount lowered to the count (None if nothing
    leaked) and the clusters that lowering leaves unreferenced."""
    entries = len(block) * 8 >> refcount_order
    repaired: bytearray | None = None
    freed: list[int] = []
    wide = refcount_order >= 3
    width = (1 << refcount_order) // 8
    for index in range(entries):
        if wide and not any(block[index * width : (index + 1) * width]):
            stored = 0
        else:
            stored = get_refcount(block, index, refcount_order)
        cluster = first_cluster + index
        expected = tally.count(cluster)
        if stored == expected:
            continue
        tally.stored[cluster] = stored
        if stored < expected:
            result.corrupt(f"cluster {cluster} refcount={stored} reference={expected}")
            continue
        result.leaks += 1
        result.say(f"Leaked cluster {cluster} refcount={stored} reference={expected}")
        if repaired is None:
            repaired = bytearray(block)
        set_refcount(repaired, index, refcount_order, expected)
        if not expected:
            freed.append(cluster)
    return repaired, freed


def highest_used(block: bytes | bytearray, refcount_order: int) -> int:
    """Index of the last nonzero refcount in a block, or -1 (pure)."""
    length = len(bytes(block).rstrip(b"\0"))
    if not length:
        return -1
    first = ((length - 1) * 8) >> refcount_order
    return max(
        i
        for i in range(first, first + max(1, 8 >> refcount_order))
        if get_refcount(block, i, refcount_order)
    )


class _Walk:
    """One check of one image: the reads, around a :class:`Tally`."""

    def __init__(self, file: ImageFile, header: Header) -> None:
        self.file = file
        self.header = header
        self.geometry = Geometry(header.cluster_bits, header.extended_l2)
        self.cluster = header.cluster_size
        self.result = CheckResult()
        self.tally = Tally(header.cluster_bits, file.size, self.result)
        self.l1_copied: list[tuple[int, int, bool]] = []

    def _in_file(self, offset: int, length: int, what: str) -> bool:
        if offset % self.cluster or offset + length > self.file.size:
            self.result.corrupt(
                f"{what} at {offset:#x}+{length:#x} is not a valid range of the file"
            )
            return False
        return True

    async def l1_table(self, offset: int, size: int, active: bool) -> None:
        what = "L1 table" if active else "snapshot L1 table"
        if not size:
            return
        if size * 8 > MAX_L1_BYTES:
            self.result.failed(f"{what} of {size} entries is too large")
            return
        if not self._in_file(offset, size * 8, what):
            return
        self.tally.metadata(offset, size * 8, what)
        l1 = decode_table(await self.file.read(offset, size * 8))
        for index, entry in enumerate(l1):
            l2 = entry & OFFSET_MASK
            if not l2:
                continue
            if not self._in_file(l2, self.cluster, f"L2 table of {what} entry {index}"):
                continue
            self.tally.metadata(l2, self.cluster, "L2 table")
            if active:
                self.l1_copied.append((index, l2 // self.cluster, bool(entry & OFLAG_COPIED)))
            table = decode_table(await self.file.read(l2, self.cluster))
            self.tally.l2_table(table, self.geometry, active)

    async def snapshots(self) -> None:
        header = self.header
        if not header.nb_snapshots:
            return
        if header.nb_snapshots > MAX_SNAPSHOTS:
            self.result.failed(f"{header.nb_snapshots} snapshots is over QEMU's limit")
            return
        offset = header.snapshots_offset
        if offset % self.cluster or offset >= self.file.size:
            self.result.corrupt(f"snapshot table at {offset:#x} is not a valid range of the file")
            return
        position = offset
        for number in range(header.nb_snapshots):
            data = await self.file.read(
                position, min(SnapshotHeader.STRUCT.size, self.file.size - position)
            )
            if len(data) < SnapshotHeader.STRUCT.size:
                self.result.corrupt(f"snapshot {number} lies past the end of the file")
                return
            snapshot = SnapshotHeader.unpack(data)
            await self.l1_table(snapshot.l1_table_offset, snapshot.l1_size, active=False)
            position += snapshot.entry_size
        self.tally.metadata(offset, position - offset, "snapshot table")

    async def extensions(self) -> None:
        """Clusters named by header extensions: the crypto header, and bitmaps unless
        autoclear bit 0 says they are stale (QEMU then ignores them: their clusters leak)."""
        for extension in self.header.extensions:
            length = len(extension.data)
            if extension.type == EXT_CRYPTO and length >= CryptoExtension.STRUCT.size:
                crypto = CryptoExtension.unpack(extension.data)
                self.tally.metadata(crypto.offset, crypto.length, "crypto header")
            elif (
                extension.type == EXT_BITMAPS
                and length >= BitmapsExtension.STRUCT.size
                and self.header.autoclear_features & AUTOCLEAR_BITMAPS
            ):  # else stale
                await self.bitmaps(BitmapsExtension.unpack(extension.data))

    async def bitmaps(self, bitmaps: BitmapsExtension) -> None:
        size, offset = bitmaps.bitmap_directory_size, bitmaps.bitmap_directory_offset
        if not size:
            return
        if size > 64 << 20 or not self._in_file(offset, size, "bitmap directory"):
            return
        self.tally.metadata(offset, size, "bitmap directory")
        directory = await self.file.read(offset, size)
        position = 0
        for _number in range(bitmaps.nb_bitmaps):
            if position + BitmapDirEntry.STRUCT.size > len(directory):
                self.result.corrupt("bitmap directory entry runs past the directory")
                return
            entry = BitmapDirEntry.unpack(directory, position)
            position += entry.entry_size
            table_offset, table_size = entry.bitmap_table_offset, entry.bitmap_table_size
            if not table_size:
                continue
            if table_size * 8 > MAX_L1_BYTES or not self._in_file(
                table_offset, table_size * 8, "bitmap table"
            ):
                continue
            self.tally.metadata(table_offset, table_size * 8, "bitmap table")
            for table_entry in decode_table(await self.file.read(table_offset, table_size * 8)):
                data = table_entry & BitmapDirEntry.TABLE_OFFSET_MASK
                if data and self._in_file(data, self.cluster, "bitmap data cluster"):
                    self.tally.metadata(data, self.cluster, "bitmap data")

    async def refcounts(self) -> list[tuple[int, bytearray, list[int]]]:
        """Compare the stored refcounts with the tally; the refcount blocks that repairing
        the leaks rewrites (offset, new block, clusters it frees)."""
        header, result, tally = self.header, self.result, self.tally
        order = header.refcount_order
        per_block = refcount_entries(header.cluster_bits, order)
        blocks: list[tuple[int, int]] = []
        for index, entry in enumerate(self.reftable):
            offset = entry & REFT_OFFSET_MASK
            if not offset:
                continue
            if offset % self.cluster:
                result.corrupt(f"refcount block {index} at {offset:#x} is not cluster aligned")
            elif offset >= self.file.size:
                result.corrupt(f"refcount block {index} at {offset:#x} is outside the image")
            else:
                tally.metadata(offset, self.cluster, "refcount block")
                blocks.append((index, offset))
        rewrites = []
        for index, offset in blocks:
            block = await self.file.read(offset, self.cluster)
            first = index * per_block
            repaired, freed = compare_block(block, first, tally, order, result)
            if repaired is not None:
                rewrites.append((offset, repaired, freed))
            last = highest_used(block, order)
            if last >= 0:
                result.image_end_offset = max(
                    result.image_end_offset, (first + last + 1) * self.cluster
                )
        covered = {index for index, _ in blocks}
        for index in range(-(-len(tally.counts) // per_block)):
            if index in covered or not any(
                tally.counts[index * per_block : (index + 1) * per_block]
            ):
                continue
            for cluster in range(
                index * per_block, min((index + 1) * per_block, len(tally.counts))
            ):
                if tally.counts[cluster]:
                    tally.stored[cluster] = 0
                    result.corrupt(
                        f"cluster {cluster} refcount=0 "
                        f"reference={tally.counts[cluster]} (no refcount block "
                        "covers it)"
                    )
        return rewrites

    async def run(self, repair: bool) -> CheckResult:
        header, tally, result = self.header, self.tally, self.result
        result.total_clusters = -(-header.size // self.cluster)
        tally.metadata(0, self.cluster, "header")
        await self.l1_table(header.l1_table_offset, header.l1_size, active=True)
        await self.snapshots()
        await self.extensions()
        length = header.refcount_table_clusters * self.cluster
        if (
            not length
            or length > MAX_REFTABLE_BYTES
            or not self._in_file(header.refcount_table_offset, length, "refcount table")
        ):
            result.failed("the refcount table cannot be read; refcounts were not compared")
            return result
        tally.metadata(header.refcount_table_offset, length, "refcount table")
        self.reftable = decode_table(await self.file.read(header.refcount_table_offset, length))
        rewrites = await self.refcounts()
        tally.finish(self.l1_copied, leaks_repaired=repair)
        if repair and rewrites and not result.corruptions and not result.check_errors:
            await self.repair(rewrites)
        return result

    async def repair(self, rewrites: list[tuple[int, bytearray, list[int]]]) -> None:
        """Lower the leaked refcounts, flush, then give the freed space back to the host."""
        for offset, block, _ in rewrites:
            await self.file.write(offset, block)
        await self.file.flush()
        for _, _, freed in rewrites:
            for cluster in freed:
                start = cluster * self.cluster
                if start < self.file.size:
                    await self.file.discard(start, min(self.cluster, self.file.size - start))
        self.result.leaks_fixed = self.result.leaks
        self.result.leaks = 0


async def check(file: ImageFile, repair: bool = False) -> CheckResult:
    """Check the image in ``file``; with ``repair``, lower leaked refcounts if the image has
    no corruption. Raises BlockError (EINVAL) if the header is not a qcow2 header; I/O errors
    propagate."""
    header, _ = await read_header(file)
    return await _Walk(file, header).run(repair)


async def check_child(file: Child, repair: bool) -> dict[str, Any]:
    """:func:`check` of the image in ``file``, as plain data (``blkfs image check``)."""
    return (await check(ChildFile(file), repair)).as_dict()


async def repair_on_open(file: Child) -> int:
    """Before an image is opened writable with ``repair=leaks``: refuse it if corrupt
    (EUCLEAN, naming the command that says why), else repair its leaks. Returns the number
    of leaked clusters repaired."""
    result = await check(ChildFile(file), repair=True)
    filename = file.node.filename() or file.node.name
    if result.corruptions or result.check_errors:
        first = next((m for m in result.messages if m.startswith("ERROR")), "")
        errors = f", {result.check_errors} check error(s)" if result.check_errors else ""
        raise BlockError(
            errno.EUCLEAN,
            f"qcow2: corrupt image {filename}: {result.corruptions} corruption(s)"
            f"{errors} ({first.removeprefix('ERROR ')}); it opens read-only only; "
            f"'blkfs image check {filename}' lists the problems",
        )
    if result.leaks_fixed:
        log.info("qcow2: %s: repaired %d leaked cluster(s)", filename, result.leaks_fixed)
    return result.leaks_fixed


__all__ = [
    "CheckResult",
    "Tally",
    "check",
    "check_child",
    "compare_block",
    "highest_used",
    "repair_on_open",
]
