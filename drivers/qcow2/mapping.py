"""qcow2 cluster mapping: where the bytes of a guest range live, as functions of values.

Reference: QEMU docs/interop/qcow2.txt, "Cluster mapping", and block/qcow2-cluster.c, whose
function names these follow where one exists. Ground rules:

* No I/O and no state: every function takes the geometry, a decoded L2 table (an
  ``array('Q')``, two entries per cluster with extended L2) and offsets, and returns values.
  The driver loads the tables and does the reads and writes.
* A table entry that points somewhere no data can be (not a whole cluster, or the header
  cluster) raises :func:`corrupt`: that request fails with EIO, nothing else.
* Hot paths (every read and in-place write maps through here) allocate nothing per cluster
  but the :class:`ClusterMapping` tuples they return.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from blkfs.block import BlockError

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK / L2E_OFFSET_MASK
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32  # per cluster, with extended L2 entries
SECTOR = 512
ALL_ALLOCATED = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOCATED << SUBCLUSTERS


def corrupt(message: str) -> BlockError:
    """The error of a request (or an open) that met metadata no valid image holds."""
    return BlockError(errno.EIO, f"qcow2: corrupt image: {message}")


class Kind(Enum):
    """What a guest range maps to (QEMU's QCow2SubclusterType, simplified)."""

    UNALLOCATED = "unallocated"  # from the backing file, or zeros without one
    ZERO = "zero"  # reads as zeros
    NORMAL = "normal"  # data at a host offset
    COMPRESSED = "compressed"  # a compressed cluster


@dataclass(frozen=True)
class Geometry:
    """The numbers every mapping needs, from cluster_bits and the L2 entry width.

    Derived values are plain fields, computed once: every request computes indexes from
    them, and an attribute the interpreter can specialise costs a quarter of a cached
    property's."""

    cluster_bits: int
    extended_l2: bool = False
    cluster_size: int = field(init=False)
    l2_entry_size: int = field(init=False)
    l2_entries: int = field(init=False)
    """Guest clusters one L2 table maps."""
    subcluster_size: int = field(init=False)
    csize_shift: int = field(init=False)
    """Where the sector count starts in a compressed descriptor (spec: x = 62 - (b - 8))."""
    l1_shift: int = field(init=False)
    """log2 of the guest bytes one L2 table maps."""

    def __post_init__(self) -> None:
        bits, extended = self.cluster_bits, self.extended_l2
        cluster_size = 1 << bits
        entry_size = 16 if extended else 8
        derived = {
            "cluster_size": cluster_size,
            "l2_entry_size": entry_size,
            "l2_entries": cluster_size // entry_size,
            "subcluster_size": cluster_size // SUBCLUSTERS if extended else cluster_size,
            "csize_shift": 62 - (bits - 8),
            "l1_shift": bits + bits - (4 if extended else 3),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def l1_index(self, offset: int) -> int:
        return offset >> self.l1_shift

    def l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_entries - 1)

    def l1_size_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes."""
        span = self.l2_entries << self.cluster_bits
        return -(-size // span)

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of a compressed cluster's data."""
        shift = self.csize_shift
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (62 - shift)) - 1)) + 1
        return offset, sectors * SECTOR - (offset & (SECTOR - 1))

    def check_cluster(self, offset: int, what: str) -> None:
        """Raise :func:`corrupt` unless ``offset`` starts a cluster after the header's."""
        if offset % self.cluster_size or offset < self.cluster_size:
            raise corrupt(f"{what} at offset {offset} is not a valid cluster")


class ClusterMapping(NamedTuple):
    """One guest cluster (or the part a request touches) and where its bytes come from.

    A named tuple, not a dataclass: one is made per cluster a request touches."""

    kind: Kind
    host: int = 0
    """Host offset of the cluster (NORMAL), or of the compressed data (COMPRESSED)."""
    length: int = 0
    """Compressed byte count (COMPRESSED)."""
    copied: bool = False
    """Refcount is exactly one: may be written in place."""


UNALLOCATED = ClusterMapping(Kind.UNALLOCATED)

Extents = list[tuple[int, int, ClusterMapping]]
"""A guest range cut into (guest offset, length, mapping), in order."""


# -- L2 entries -----------------------------------------------------------------------------


def l2_entry(table: array[int], index: int, extended_l2: bool) -> tuple[int, int]:
    """(entry, subcluster bitmap) of guest cluster ``index`` of an L2 table."""
    if extended_l2:
        return table[2 * index], table[2 * index + 1]
    return table[index], 0


def set_l2_entry(table: array[int], index: int, extended_l2: bool, entry: int, bitmap: int) -> None:
    if extended_l2:
        table[2 * index] = entry
        table[2 * index + 1] = bitmap
    else:
        table[index] = entry


def decode(entry: int, bitmap: int, geometry: Geometry, subcluster: int) -> ClusterMapping:
    """What one L2 entry says about one subcluster (the whole cluster without extended L2)."""
    copied = bool(entry & OFLAG_COPIED)
    if entry & OFLAG_COMPRESSED:
        host, length = geometry.compressed_range(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED))
        return ClusterMapping(Kind.COMPRESSED, host, length)
    host = entry & OFFSET_MASK
    if geometry.extended_l2:
        if bitmap >> (SUBCLUSTERS + subcluster) & 1:
            return ClusterMapping(Kind.ZERO, host, copied=copied)
        if host and bitmap >> subcluster & 1:
            return ClusterMapping(Kind.NORMAL, host, copied=copied)
        return ClusterMapping(Kind.UNALLOCATED, host, copied=copied)
    if entry & OFLAG_ZERO:
        return ClusterMapping(Kind.ZERO, host, copied=copied)
    if host:
        return ClusterMapping(Kind.NORMAL, host, copied=copied)
    return UNALLOCATED


def data_run(table: Sequence[int], index: int, limit: int, host: int, cluster_size: int) -> int:
    """How many standard L2 entries from ``index`` up to ``limit`` map data clusters lying back
    to back on disk from ``host``: a large read maps such a run in one step instead of one
    :func:`decode` per cluster. Each entry counted is one decode() calls NORMAL."""
    count = 0
    while index < limit:
        entry = table[index]
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) or entry & OFFSET_MASK != host:
            break
        count += 1
        index += 1
        host += cluster_size
    return count


def unallocated_run(table: Sequence[int], index: int, limit: int) -> int:
    """How many standard L2 entries from ``index`` up to ``limit`` are 0 (unallocated): a
    large request over a hole maps it in one step instead of one :func:`decode` per cluster."""
    count = 0
    while index + count < limit and not table[index + count]:
        count += 1
    return count


def host_runs(hosts: Iterable[int], cluster_size: int) -> list[tuple[int, int]]:
    """Host clusters as (offset, length) runs of clusters back to back on disk, in order:
    freeing a whole image gives its space back in a few discards instead of one per
    cluster."""
    runs: list[tuple[int, int]] = []
    for host in sorted(set(hosts)):
        if runs and runs[-1][0] + runs[-1][1] == host:
            runs[-1] = (runs[-1][0], runs[-1][1] + cluster_size)
        else:
            runs.append((host, cluster_size))
    return runs


def fully_allocated(entry: int, bitmap: int, geometry: Geometry) -> bool:
    """True if every byte of the cluster is data at its host offset, written in place safely."""
    if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) or not entry & OFLAG_COPIED:
        return False
    if not entry & OFFSET_MASK:
        return False
    return not geometry.extended_l2 or bitmap == ALL_ALLOCATED


def host_clusters(geometry: Geometry, entry: int) -> range:
    """The host clusters an L2 entry holds a reference to (none, one, or the clusters a
    compressed cluster's data spans)."""
    cluster_size = geometry.cluster_size
    if entry & OFLAG_COMPRESSED:
        host, length = geometry.compressed_range(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED))
        return range(host - host % cluster_size, host + length, cluster_size)
    host = entry & OFFSET_MASK
    return range(host, host + 1 if host else host, cluster_size)


def zero_entry(geometry: Geometry, version: int, has_backing: bool) -> tuple[int, int] | None:
    """(entry, bitmap) that reads as zeros with no host cluster, if the image has one: the
    zero flag (v3), all subclusters zero (extended L2), or unallocated where no backing file
    shows through (v2, which has no zero flag)."""
    if geometry.extended_l2:
        return 0, ALL_ZERO
    if version >= 3:
        return OFLAG_ZERO, 0
    return (0, 0) if not has_backing else None


def zeroed_entry(
    geometry: Geometry, version: int, has_backing: bool, entry: int, unmap: bool
) -> tuple[int, int] | None:
    """(entry, bitmap) that makes a whole cluster, now ``entry``, read as zeros (QEMU's
    zero_in_l2_slice): with ``unmap`` (and always for a compressed cluster) a
    :func:`zero_entry`, without a host cluster; otherwise the host cluster it holds stays,
    zero-flagged, so a later write there needs no new space. None where the image has no
    such entry (v2: no zero flag), and zeros must be written instead."""
    host = entry & OFFSET_MASK
    if unmap or not host or entry & OFLAG_COMPRESSED:
        return zero_entry(geometry, version, has_backing)
    if geometry.extended_l2:
        return entry, ALL_ZERO
    if version >= 3:
        return entry | OFLAG_ZERO, 0
    return None


def reusable_host(entry: int) -> int:
    """The host cluster an allocating write into the cluster of ``entry`` may write in
    place of a new one: the one it holds if nothing else shares it (OFLAG_COPIED), zeroed
    or, with extended L2, partly allocated (QEMU's cluster_needs_new_alloc says no); else 0.
    Called for clusters :func:`fully_allocated` refuses."""
    if entry & OFLAG_COMPRESSED or not entry & OFLAG_COPIED:
        return 0
    return entry & OFFSET_MASK


# -- mapping a request ----------------------------------------------------------------------


def map_table(
    extents: Extents, geometry: Geometry, offset: int, end: int, table: array[int] | None
) -> int:
    """Append to ``extents`` the mappings of ``offset`` up to ``end`` or the end of the range
    ``table`` maps (the L2 table of ``offset``, or None for an unallocated one), contiguous
    host data merged; return where that stopped (QEMU's qcow2_get_host_offset, for as many
    clusters as one table maps)."""
    cluster_size = geometry.cluster_size
    extended = geometry.extended_l2
    unit = geometry.subcluster_size
    shift = geometry.l1_shift
    stop = min(end, ((offset >> shift) + 1) << shift)
    while offset < stop:
        span = min(unit - offset % unit, stop - offset)
        if table is None:
            mapping, span = UNALLOCATED, stop - offset
        else:
            index = geometry.l2_index(offset)
            entry, bitmap = l2_entry(table, index, extended)
            mapping = decode(entry, bitmap, geometry, (offset % cluster_size) // unit)
            if mapping.kind is Kind.NORMAL:
                geometry.check_cluster(mapping.host, "data cluster")
                if not extended and offset + span < stop:
                    more = -(-(stop - offset - span) // cluster_size)
                    run = data_run(
                        table,
                        index + 1,
                        index + 1 + more,
                        mapping.host + cluster_size,
                        cluster_size,
                    )
                    span = min(stop - offset, span + run * cluster_size)
            elif not entry and not extended and offset + span < stop:
                more = -(-(stop - offset - span) // cluster_size)
                run = unallocated_run(table, index + 1, index + 1 + more)
                span = min(stop - offset, span + run * cluster_size)
        if extents:
            last_off, last_len, last = extents[-1]
            kind = mapping.kind
            if (
                kind is last.kind
                and kind is not Kind.COMPRESSED
                and (
                    kind is not Kind.NORMAL
                    or mapping.host + offset % cluster_size
                    == last.host + (last_off % cluster_size) + last_len
                )
            ):
                extents[-1] = (last_off, last_len + span, last)
                offset += span
                continue
        extents.append((offset, span, mapping))
        offset += span
    return offset


def in_place_run(
    geometry: Geometry, table: array[int], offset: int, end: int
) -> tuple[int, int] | None:
    """(host offset, length) of the longest run from ``offset`` towards ``end`` that
    ``table`` maps to allocated, unshared clusters lying back to back on the host; None if
    the first cluster cannot be written in place (QEMU's handle_copied)."""
    cluster = geometry.cluster_size
    extended = geometry.extended_l2
    index = geometry.l2_index(offset)
    entry, bitmap = l2_entry(table, index, extended)
    if not fully_allocated(entry, bitmap, geometry):
        return None
    geometry.check_cluster(entry & OFFSET_MASK, "data cluster")
    host = (entry & OFFSET_MASK) + offset % cluster
    length = min(end - offset, cluster - offset % cluster)
    while offset + length < end and index + 1 < geometry.l2_entries:
        index += 1
        entry, bitmap = l2_entry(table, index, extended)
        if not fully_allocated(entry, bitmap, geometry) or entry & OFFSET_MASK != host + length:
            break
        length += min(end - offset - length, cluster)
    return host, length


def allocation_run(geometry: Geometry, table: array[int], index: int, start: int, end: int) -> int:
    """How many clusters from ``index`` (guest cluster at ``start``) one allocating write up
    to ``end`` takes: the first, then each following one of this table it covers whole and
    that holds no host cluster it could write in place (QEMU's handle_alloc)."""
    cluster = geometry.cluster_size
    extended = geometry.extended_l2
    count = 1
    while (
        index + count < geometry.l2_entries
        and start + (count + 1) * cluster <= end
        and not reusable_host(l2_entry(table, index + count, extended)[0])
    ):
        count += 1
    return count
