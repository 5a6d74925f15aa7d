"""The refcount allocator: new clusters, refcount updates, and references dropped for later.

Reference: QEMU block/qcow2-refcount.c (``qcow2_alloc_clusters``, ``update_refcount``,
``alloc_refcount_block``, ``qcow2_refcount_area``). Ground rules:

* New clusters are appended at the end of the image, and freed clusters are never reused
  while the image is open, so a read that mapped a cluster just before a concurrent discard
  never sees another cluster's data. The space of freed clusters goes back to the host once
  no durable metadata references them (the driver punches ``freed``).
* A refcount rises before any reference to the cluster is written (the metadata cache's
  order); a reference dropped in cached metadata is only noted (``dropped``), and its
  refcount falls once metadata without it is durable (:class:`DeferredDecreases`). A crash
  at any moment therefore leaves at worst leaked clusters.
* Every method runs with the image's metadata lock held.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from blkfs.block import BlockError

from .cache import Barrier, CachedTables, RefcountTable, WriteBack
from .imagefile import ImageFile, write_header
from .mapping import OFFSET_MASK, Geometry, corrupt
from .ondisk import (
    MAX_REFTABLE_BYTES,
    Header,
    get_refcount,
    refcount_entries,
    set_refcount,
)


class RefcountAllocator:
    """Allocates clusters and keeps their refcounts, in the cached refcount blocks."""

    def __init__(self, file: ImageFile, header: Header, table: RefcountTable,
                 blocks: CachedTables[bytearray], barrier: Barrier) -> None:
        self.file = file
        self.header = header
        self.geometry = Geometry(header.cluster_bits, header.extended_l2)
        self.cluster_size = header.cluster_size
        self.table = table
        self.blocks = blocks
        self.barrier = barrier
        self.block_entries = refcount_entries(header.cluster_bits, header.refcount_order)
        self.next_free = -(-file.size // self.cluster_size) * self.cluster_size
        """Where the next new cluster goes: the end of the image, as it was at open."""
        self.freed: list[int] = []
        """Host clusters whose refcount fell to zero; their space is not given back yet."""
        self.dropped: list[int] = []
        """Host clusters whose reference was dropped in cached metadata; their refcounts
        fall once metadata without the reference is on disk."""

    async def allocate(self, count: int) -> int:
        """``count`` new contiguous clusters at the end of the image, refcounted."""
        host = self.next_free
        self.next_free += count * self.cluster_size
        for i in range(count):
            await self.update_refcount(host + i * self.cluster_size, 1)
        return host

    def drop(self, hosts: Iterable[int]) -> None:
        """References to these host clusters are gone from cached metadata; their refcounts
        fall after that metadata is durable."""
        self.dropped.extend(hosts)

    async def apply_dropped(self) -> None:
        """Lower the refcounts of the dropped references (once nothing durable holds them)."""
        dropped, self.dropped = self.dropped, []
        for host in dropped:
            await self.update_refcount(host, -1)

    async def refcount(self, host: int) -> int:
        """The refcount of the host cluster at ``host``."""
        block_index, index = divmod(host // self.cluster_size, self.block_entries)
        entries = self.table.entries
        block_offset = entries[block_index] & OFFSET_MASK if block_index < len(entries) else 0
        if not block_offset:
            return 0
        self.geometry.check_cluster(block_offset, "refcount block")
        return get_refcount(await self.blocks.load(block_offset), index,
                            self.header.refcount_order)

    async def update_refcount(self, host: int, delta: int) -> None:
        """Add ``delta`` to the refcount of the host cluster at ``host``, making room in the
        refcount structures first if they do not cover it yet."""
        cluster = host // self.cluster_size
        block_index, index = divmod(cluster, self.block_entries)
        if block_index >= self.table.room:
            await self._grow_table(block_index + 1)
        entries = self.table.entries
        if block_index >= len(entries):  # past the last block in use: zeros, as on disk
            entries.extend([0] * (block_index + 1 - len(entries)))
        block_offset = entries[block_index] & OFFSET_MASK
        if not block_offset:
            block_offset = await self._new_block(block_index)
        self.geometry.check_cluster(block_offset, "refcount block")
        block = await self.blocks.load(block_offset)
        order = self.header.refcount_order
        value = get_refcount(block, index, order) + delta
        if value < 0:
            raise corrupt(f"refcount of cluster {cluster} would drop below zero")
        try:
            set_refcount(block, index, order, value)
        except OverflowError:
            raise BlockError(errno.ENOSPC, f"qcow2: refcount of cluster {cluster} would "
                             f"exceed {self.header.refcount_bits} bits") from None
        self.blocks.tables.mark_dirty(block_offset)
        if value == 0:
            self.freed.append(host)

    async def _new_block(self, block_index: int) -> int:
        """A new refcount block at the end of the image; it counts itself where it can
        (QEMU's alloc_refcount_block)."""
        host = self.next_free
        self.next_free += self.cluster_size
        self.blocks.tables.put(host, bytearray(self.cluster_size), dirty=True)
        self.table.entries[block_index] = host
        self.table.dirty = True
        await self.update_refcount(host, 1)
        await self.blocks.evict()
        return host

    async def _grow_table(self, entries: int) -> None:
        """Move the refcount table to a larger place at the end (QEMU's
        qcow2_refcount_area): durable there before the header names it, and the old table's
        clusters freed only after."""
        cluster = self.cluster_size
        clusters = -(-max(entries, 2 * self.table.room) * 8 // cluster)
        if clusters * cluster > MAX_REFTABLE_BYTES:
            raise BlockError(errno.EFBIG, "qcow2: the refcount table would exceed its limit")
        header = self.header
        old_offset, old_clusters = header.refcount_table_offset, header.refcount_table_clusters
        host = self.next_free
        self.next_free += clusters * cluster
        self.table.entries.extend([0] * (clusters * cluster // 8 - len(self.table.entries)))
        header.refcount_table_offset, header.refcount_table_clusters = host, clusters
        for i in range(clusters):
            await self.update_refcount(host + i * cluster, 1)
        self.table.dirty = True
        await self.table.write_back()
        await self.barrier()
        await write_header(self.file, header)
        for i in range(old_clusters):
            await self.update_refcount(old_offset + i * cluster, -1)


class DeferredDecreases(WriteBack):
    """The refcount decreases of dropped references, as a kind of write-back: they wait for
    the metadata that no longer holds the references (QEMU makes the refcount cache depend on
    the L2 table cache for a decrease, in update_refcount), then go out as refcount writes."""

    def __init__(self, barrier: Barrier, allocator: RefcountAllocator,
                 depends_on: WriteBack) -> None:
        super().__init__(barrier, depends_on)
        self.allocator = allocator

    def pending(self) -> bool:
        return bool(self.allocator.dropped)

    async def write_dirty(self) -> None:
        if self.allocator.dropped:
            await self.allocator.apply_dropped()
            await self.allocator.table.write_back()

    def clean(self, keys: list[int]) -> None:
        """Nothing to clean: the refcount blocks and table it wrote clean themselves."""
