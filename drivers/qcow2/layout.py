"""qcow2 address arithmetic: L1/L2 indexing, entry decoding, refcount fields. No I/O.

Reference: QEMU docs/interop/qcow2.txt, "Host cluster management" and "Cluster mapping";
function names follow QEMU's block/qcow2.h where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import NamedTuple, Sequence

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK / L2E_OFFSET_MASK
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32                  # per cluster, with extended L2 entries
SECTOR = 512


class Kind(Enum):
    """What a guest range maps to (QEMU's QCow2SubclusterType, simplified)."""

    UNALLOCATED = "unallocated"   # from the backing file, or zeros without one
    ZERO = "zero"                 # reads as zeros
    NORMAL = "normal"             # data at a host offset
    COMPRESSED = "compressed"     # a compressed cluster


@dataclass(frozen=True)
class Geometry:
    """The numbers every mapping needs, from cluster_bits and the L2 entry width.

    Derived values are cached: every request computes indexes from them."""

    cluster_bits: int
    extended_l2: bool = False

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @cached_property
    def l2_entries(self) -> int:
        """Guest clusters one L2 table maps."""
        return self.cluster_size // self.l2_entry_size

    @cached_property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size

    @cached_property
    def csize_shift(self) -> int:
        """Where the sector count starts in a compressed descriptor (spec: x = 62 - (b - 8))."""
        return 62 - (self.cluster_bits - 8)

    @cached_property
    def l1_shift(self) -> int:
        """log2 of the guest bytes one L2 table maps."""
        return self.cluster_bits + self.cluster_bits - (4 if self.extended_l2 else 3)

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


class Mapping(NamedTuple):
    """One guest cluster (or the part a request touches) and where its bytes come from.

    A named tuple, not a dataclass: one is made per cluster a request touches."""

    kind: Kind
    host: int = 0
    """Host offset of the cluster (NORMAL), or of the compressed data (COMPRESSED)."""
    length: int = 0
    """Compressed byte count (COMPRESSED)."""
    copied: bool = False
    """Refcount is exactly one: may be written in place."""


def decode(entry: int, bitmap: int, geometry: Geometry, subcluster: int) -> Mapping:
    """What one L2 entry says about one subcluster (the whole cluster without extended L2)."""
    copied = bool(entry & OFLAG_COPIED)
    if entry & OFLAG_COMPRESSED:
        host, length = geometry.compressed_range(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED))
        return Mapping(Kind.COMPRESSED, host, length)
    host = entry & OFFSET_MASK
    if geometry.extended_l2:
        if bitmap >> (SUBCLUSTERS + subcluster) & 1:
            return Mapping(Kind.ZERO, host, copied=copied)
        if host and bitmap >> subcluster & 1:
            return Mapping(Kind.NORMAL, host, copied=copied)
        return Mapping(Kind.UNALLOCATED, host, copied=copied)
    if entry & OFLAG_ZERO:
        return Mapping(Kind.ZERO, host, copied=copied)
    if host:
        return Mapping(Kind.NORMAL, host, copied=copied)
    return Mapping(Kind.UNALLOCATED)


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


def fully_allocated(entry: int, bitmap: int, geometry: Geometry) -> bool:
    """True if every byte of the cluster is data at its host offset, written in place safely."""
    if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) or not entry & OFLAG_COPIED:
        return False
    if not entry & OFFSET_MASK:
        return False
    return not geometry.extended_l2 or bitmap == (1 << SUBCLUSTERS) - 1


ALL_ALLOCATED = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOCATED << SUBCLUSTERS


# -- refcount blocks ------------------------------------------------------------------------

def refcount_entries(cluster_bits: int, refcount_order: int) -> int:
    """Refcounts one refcount block holds."""
    return (1 << (cluster_bits + 3)) >> refcount_order


def get_refcount(block: bytes | bytearray, index: int, refcount_order: int) -> int:
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    shift = (index % per_byte) * bits  # spec: low-order bits first within a byte
    return (byte >> shift) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, refcount_order: int, value: int) -> None:
    bits = 1 << refcount_order
    if value < 0 or value >= 1 << bits:
        raise OverflowError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    position = index // per_byte
    block[position] = (block[position] & ~mask) | (value << shift)
