"""The refcount allocator: new clusters, refcount updates, and references dropped for later.

Reference: QEMU block/qcow2-refcount.c (``qcow2_alloc_clusters``, ``update_refcount``,
``alloc_refcount_block``, ``qcow2_refcount_area``). Ground rules:

* New clusters come from the clusters freed while the image is open (lowest first, as
  QEMU's free_cluster_index), else from the end of the image. A freed cluster is reused only
  once the driver hands it back (:meth:`RefcountAllocator.reuse`): after the metadata
  without its last reference and its lowered refcount are durable, its space has gone back
  to the host, and no request is in flight that mapped it before it was dropped. So a crash
  never leaves durable metadata pointing at a cluster that holds another's data, and a read
  never sees another cluster's data.
* A refcount rises before any reference to the cluster is written (the metadata cache's
  order); a reference dropped in cached metadata is only noted (``dropped``), and its
  refcount falls once metadata without it is durable (:class:`DeferredDecreases`). A crash
  at any moment therefore leaves at worst leaked clusters.
* Every method runs with the image's metadata lock held.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
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


class FreeClusters:
    """Host clusters free for reuse, as sorted, merged runs of bytes [start, end)."""

    def __init__(self, cluster_size: int) -> None:
        self.cluster_size = cluster_size
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, host: int) -> None:
        """One more free cluster; ValueError if it is free already (a double free)."""
        starts, ends = self.starts, self.ends
        end = host + self.cluster_size
        at = bisect_right(starts, host)
        if (at and ends[at - 1] > host) or (at < len(starts) and starts[at] < end):
            raise ValueError(f"cluster at {host} is free already")
        if at and ends[at - 1] == host:  # extends the run before it
            at -= 1
            ends[at] = end
        else:
            starts.insert(at, host)
            ends.insert(at, end)
        if at + 1 < len(starts) and starts[at + 1] == ends[at]:  # meets the run after it
            ends[at] = ends.pop(at + 1)
            del starts[at + 1]

    def take(self, count: int, exact: bool) -> tuple[int, int] | None:
        """(host, clusters) from the lowest run: ``count`` clusters of the first run that has
        them if ``exact``, else up to ``count`` of the first run; None if there is none."""
        cluster = self.cluster_size
        found = next(
            (
                at
                for at, (start, end) in enumerate(zip(self.starts, self.ends, strict=True))
                if not exact or end - start >= count * cluster
            ),
            None,
        )
        if found is None:
            return None
        host = self.starts[found]
        taken = min(count, (self.ends[found] - host) // cluster)
        self.starts[found] += taken * cluster
        if self.starts[found] == self.ends[found]:
            del self.starts[found], self.ends[found]
        return host, taken


class RefcountAllocator:
    """Allocates clusters and keeps their refcounts, in the cached refcount blocks."""

    def __init__(
        self,
        file: ImageFile,
        header: Header,
        table: RefcountTable,
        blocks: CachedTables[bytearray],
        barrier: Barrier,
    ) -> None:
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
        """Host clusters whose refcount fell to zero; not yet handed back for reuse."""
        self.free = FreeClusters(self.cluster_size)
        """Freed clusters handed back: the next allocations take them."""
        self.dropped: list[int] = []
        """Host clusters whose reference was dropped in cached metadata; their refcounts
        fall once metadata without the reference is on disk."""

    async def allocate(self, count: int) -> int:
        """``count`` new contiguous clusters, refcounted."""
        return (await self._allocate(count, exact=True))[0]

    async def allocate_run(self, count: int) -> tuple[int, int]:
        """(host, clusters): up to ``count`` new contiguous clusters (at least one),
        refcounted; fewer where only a shorter run of freed clusters is at hand."""
        return await self._allocate(count, exact=False)

    async def _allocate(self, count: int, exact: bool) -> tuple[int, int]:
        reused = self.free.take(count, exact)
        if reused is None:
            host = self.next_free
            self.next_free += count * self.cluster_size
        else:
            host, count = reused
        hosts = range(host, host + count * self.cluster_size, self.cluster_size)
        values = await self.update_refcounts(hosts, 1)
        if reused is not None:
            for at, value in zip(hosts, values, strict=True):
                if value != 1:
                    raise corrupt(f"freed cluster at {at} has refcount {value} when reused")
        return host, count

    def reuse(self, hosts: Iterable[int]) -> None:
        """These freed clusters may be allocated again (see the ground rules)."""
        for host in hosts:
            try:
                self.free.add(host)
            except ValueError as exc:
                raise corrupt(str(exc)) from None

    def drop(self, hosts: Iterable[int]) -> None:
        """References to these host clusters are gone from cached metadata; their refcounts
        fall after that metadata is durable."""
        self.dropped.extend(hosts)

    async def apply_dropped(self) -> None:
        """Lower the refcounts of the dropped references (once nothing durable holds them)."""
        dropped, self.dropped = self.dropped, []
        await self.update_refcounts(dropped, -1)

    async def refcount(self, host: int) -> int:
        """The refcount of the host cluster at ``host``."""
        block_index, index = divmod(host // self.cluster_size, self.block_entries)
        entries = self.table.entries
        block_offset = entries[block_index] & OFFSET_MASK if block_index < len(entries) else 0
        if not block_offset:
            return 0
        self.geometry.check_cluster(block_offset, "refcount block")
        return get_refcount(await self.blocks.load(block_offset), index, self.header.refcount_order)

    async def update_refcount(self, host: int, delta: int) -> int:
        """Add ``delta`` to the refcount of the host cluster at ``host``; the new refcount."""
        return (await self.update_refcounts((host,), delta))[0]

    async def update_refcounts(self, hosts: Iterable[int], delta: int) -> list[int]:
        """Add ``delta`` to the refcount of each host cluster at ``hosts``, in order, making
        room in the refcount structures first where they do not cover one yet; the new
        refcounts. Hosts one after another in one refcount block look it up once: nothing
        awaits between them, so it cannot leave the cache meanwhile."""
        values: list[int] = []
        order = self.header.refcount_order
        block_index = -1
        block_offset, block = 0, bytearray()
        for host in hosts:
            cluster = host // self.cluster_size
            in_block, index = divmod(cluster, self.block_entries)
            if in_block != block_index:
                block_index = in_block
                block_offset, block = await self._refcount_block(block_index)
            value = get_refcount(block, index, order) + delta
            if value < 0:
                raise corrupt(f"refcount of cluster {cluster} would drop below zero")
            try:
                set_refcount(block, index, order, value)
            except OverflowError:
                raise BlockError(
                    errno.ENOSPC,
                    f"qcow2: refcount of cluster {cluster} would "
                    f"exceed {self.header.refcount_bits} bits",
                ) from None
            self.blocks.tables.mark_dirty(block_offset)
            if value == 0:
                self.freed.append(host)
            values.append(value)
        return values

    async def _refcount_block(self, block_index: int) -> tuple[int, bytearray]:
        """(offset, contents) of refcount block ``block_index``, made if there is none."""
        if block_index >= self.table.room:
            await self._grow_table(block_index + 1)
        entries = self.table.entries
        if block_index >= len(entries):  # past the last block in use: zeros, as on disk
            entries.extend([0] * (block_index + 1 - len(entries)))
        block_offset = entries[block_index] & OFFSET_MASK
        if not block_offset:
            block_offset = await self._new_block(block_index)
        self.geometry.check_cluster(block_offset, "refcount block")
        return block_offset, await self.blocks.load(block_offset)

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

    def __init__(
        self, barrier: Barrier, allocator: RefcountAllocator, depends_on: WriteBack
    ) -> None:
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
