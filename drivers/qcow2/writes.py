"""The qcow2 driver's changing requests: writes (in place and allocating), zeroing,
discard, and the write-back that makes them durable."""

from __future__ import annotations

from array import array
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import trio

from blkfs.block import Node, WriteFlags

from .allocations import Allocations, ClusterAllocation, Settled
from .mapped import MappedImage
from .mapping import (
    ALL_ALLOCATED,
    OFFSET_MASK,
    OFLAG_COPIED,
    Extents,
    Kind,
    allocation_run,
    host_clusters,
    host_runs,
    in_place_run,
    l2_entry,
    reusable_host,
    set_l2_entry,
    zeroed_entry,
)
from .metadata import MAINTAINED_AUTOCLEAR


@dataclass(frozen=True)
class HostRange:
    """The data of a copy into the image (:meth:`WritableImage.copy_from`): ``nbytes`` bytes
    of the host file node ``source`` at ``offset``, which the image file copies from."""

    source: Node
    offset: int
    nbytes: int


Data = memoryview | HostRange
"""What a write puts into the image: bytes, or a range of a host file to copy."""


class NotCopied(Exception):
    """The image file could not copy from a copy's source after all."""


def after(data: Data, skip: int) -> Data:
    """``data`` without its first ``skip`` bytes."""
    if isinstance(data, memoryview):
        return data[skip:]
    return HostRange(data.source, data.offset + skip, data.nbytes - skip)


@dataclass
class NewClusters:
    """The clusters an allocating write took, and what it writes into them."""

    allocation: ClusterAllocation
    within: int
    """Where the write begins in the first cluster."""
    length: int
    """The bytes of the write the clusters take."""
    around: list[tuple[int, int, Extents]]
    """The first cluster's old bytes [lo, hi) the write does not cover, mapped (QEMU's COW
    regions): a small write over a backing file reads little of it."""


class WritableImage(MappedImage):
    """Writes, zeroing, discard and write-back over the mapped image."""

    allocations: Allocations

    # -- writing ----------------------------------------------------------------------------

    async def _changing(self) -> None:
        """Before the image's first change (lock held): the autoclear bits blkfs does not
        maintain cleared (Metadata.clear_autoclear)."""
        if self.header.autoclear_features & ~MAINTAINED_AUTOCLEAR:
            await self.metadata.clear_autoclear()

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        runs = (
            None
            if self.header.autoclear_features & ~MAINTAINED_AUTOCLEAR
            else self._cached_in_place(offset, data.nbytes)
        )
        if runs is None:
            await self._write_steps(offset, data)
            return
        done = 0
        self.in_flight += 1
        try:
            for host, length in runs:  # no mapping changes: no lock (see _cached_extents)
                await self.file.write(host, data[done : done + length])
                done += length
        finally:
            self.in_flight -= 1

    async def _write_steps(self, offset: int, data: Data) -> None:
        position, end = offset, offset + data.nbytes
        while position < end:
            position += await self._write_step(position, after(data, position - offset))

    async def copy_from(self, offset: int, source: Node, source_offset: int, length: int) -> bool:
        """A copy from a host file the image file can copy from: written as a write is (in
        place, or into new clusters linked after their data), the data copied by the image
        file (``copy_file_range``), never through the process. Whole clusters only (a write
        into part of a new cluster merges the old bytes around it); False if not, or if the
        image file finds it cannot copy after all (what was copied by then is written as
        a write leaves it, and new clusters not yet linked are freed)."""
        cluster = self.cluster_size
        if offset % cluster or length % cluster or not self.file.node.driver.copies_from(source):
            return False
        try:
            await self._write_steps(offset, HostRange(source, source_offset, length))
        except NotCopied:
            return False
        return True

    async def _put(self, host: int, data: Data, length: int) -> None:
        """The first ``length`` bytes of ``data`` into the image file at ``host``."""
        if isinstance(data, memoryview):
            await self.file.write(host, data[:length])
        elif not await self.file.node.copy_from(host, data.source, data.offset, length):
            raise NotCopied

    async def _write_step(self, position: int, data: Data) -> int:
        """Write a prefix of ``data`` at ``position``, holding the lock only to map it: one
        run in place, or one allocation (:mod:`.allocations`). Returns its length, or 0
        after waiting for an allocation in flight over the same cluster (then map again)."""
        async with self.lock:
            await self._changing()
            step = await self._plan_write(position, position + data.nbytes)
            if not isinstance(step, ClusterAllocation):  # written without the lock: no
                self.in_flight += 1  # cluster it maps may be reused meanwhile
        if isinstance(step, ClusterAllocation):  # another write's, over the same cluster
            await step.done.wait()
            return 0
        try:
            if isinstance(step, NewClusters):
                return await self._write_new(step, data, self.lock)
            host, length = step
            await self._put(host, data, length)
            return length
        finally:
            self.in_flight -= 1

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        """As :meth:`write`, all of it with the lock held (by a change of the range that
        waited for the allocations in flight over it)."""
        end = offset + data.nbytes
        position = offset
        while position < end:
            step = await self._plan_write(position, end)
            assert not isinstance(step, ClusterAllocation), "the range has settled"
            chunk = data[position - offset :]
            if isinstance(step, NewClusters):
                position += await self._write_new(step, chunk, nullcontext())
            else:
                await self.file.write(step[0], chunk[: step[1]])
                position += step[1]

    async def _plan_write(
        self, position: int, end: int
    ) -> tuple[int, int] | NewClusters | ClusterAllocation:
        """How a write from ``position`` to ``end`` starts (lock held): (host offset,
        length) of a run it may write in place; new clusters for as many consecutive ones
        of this L2 table as it covers, taken and registered in flight; or the allocation in
        flight over its first cluster, to wait for.

        Only the first new cluster may be partial (further ones are taken only whole, and
        never up to an allocation in flight); the old bytes around the write in it are
        mapped now, read with the data's write. A cluster that keeps an unshared host
        cluster (zeroed without unmap) is written there instead, alone: its L2 entry reads
        zeros until the new one is linked after the data, as a new cluster's does."""
        geometry, cluster = self.geometry, self.cluster_size
        table = (await self._l2_for_write(geometry.l1_index(position)))[1]
        run = in_place_run(geometry, table, position, end)
        if run is not None:
            return run
        start = position - position % cluster
        blocking = self.allocations.blocking(start, start + cluster)
        if blocking is not None:
            return blocking
        end = self.allocations.clip(start, end)
        index = geometry.l2_index(position)
        reused = reusable_host(l2_entry(table, index, geometry.extended_l2)[0])
        if reused:  # a zeroed cluster that kept its host cluster: no new space
            geometry.check_cluster(reused, "data cluster")
            count, host = 1, reused
        else:
            host, count = await self.allocator.allocate_run(
                allocation_run(geometry, table, index, start, end)
            )
        allocation = self.allocations.begin(start, start + count * cluster, host, bool(reused))
        head, tail = position - start, min(end, start + count * cluster) - start
        around: list[tuple[int, int, Extents]] = []
        try:
            for lo, hi in ((0, head), (tail, cluster)):
                if lo < hi:
                    around.append((lo, hi, await self._extents(start + lo, hi - lo)))
        except BaseException:
            self._free(allocation)
            self.allocations.finish(allocation)
            raise
        return NewClusters(allocation, head, tail - head, around)

    async def _write_new(
        self, new: NewClusters, data: Data, lock: AbstractAsyncContextManager[Any]
    ) -> int:
        """Write the data of ``new`` and link its clusters under ``lock`` (the image's
        lock, or nothing if it is held). If the data or the link fails, or the write is
        cancelled (a failed job ends its other copies mid-write), nothing points to the new
        clusters: they are freed, never leaked. Returns the bytes of ``data`` written."""
        allocation = new.allocation
        try:
            await self._write_data(new, data)
            l1_index = self.geometry.l1_index(allocation.start)
            cached = None if self.lock.locked() else self._cached_l2(l1_index)
            if cached is not None:  # nothing can interleave: no await (see _cached_extents)
                self._link(allocation, *cached)
            else:
                async with lock:
                    self._link(allocation, *await self._l2_for_write(l1_index))
        except BaseException:
            with trio.CancelScope(shield=True):  # cancelled: the lock is still waited for
                async with lock:
                    self._free(allocation)
            raise
        finally:
            self.allocations.finish(allocation)
        return new.length

    def _free(self, allocation: ClusterAllocation) -> None:
        """Give back the new clusters of an allocation that will not be linked."""
        if not allocation.reused:
            self.allocator.drop(
                range(
                    allocation.host,
                    allocation.host + allocation.end - allocation.start,
                    self.cluster_size,
                )
            )

    async def _write_data(self, new: NewClusters, data: Data) -> None:
        """The first cluster merged with its old bytes where the write covers it in part
        (bytes only: a copy is of whole clusters), the rest straight from ``data``."""
        host, start = new.allocation.host, new.allocation.start
        within, tail = new.within, new.within + new.length
        whole_from = within
        if new.around:
            assert isinstance(data, memoryview), "a copy is of whole clusters"
            whole_from = min(tail, self.cluster_size)
            view = memoryview(bytearray(self.cluster_size))
            for lo, hi, extents in new.around:
                await self._read_extents(start + lo, view[lo:hi], extents)
            view[within:whole_from] = data[: whole_from - within]
            await self.file.write(host, view)
        if whole_from < tail:
            await self._put(host + whole_from, after(data, whole_from - within), tail - whole_from)

    def _cached_l2(self, l1_index: int) -> tuple[int, array[int]] | None:
        """The unshared L2 table of ``l1_index`` and its offset, if it is cached."""
        entry = self.l1[l1_index]
        table = self.l2_cache.get(entry & OFFSET_MASK) if entry & OFLAG_COPIED else None
        return None if table is None else (entry & OFFSET_MASK, table)

    def _link(self, allocation: ClusterAllocation, table_offset: int, table: array[int]) -> None:
        """Point the L2 entries of an allocation's guest clusters, in ``table`` (looked up
        again: it may have left the cache meanwhile), at its host clusters, whose data is
        written, and drop what they held (QEMU's qcow2_alloc_cluster_link_l2). The lock is
        held, or free and nothing awaits before the entries are set."""
        geometry, cluster = self.geometry, self.cluster_size
        extended = geometry.extended_l2
        index = geometry.l2_index(allocation.start)
        for i in range((allocation.end - allocation.start) // cluster):
            old, _ = l2_entry(table, index + i, extended)
            entry = (allocation.host + i * cluster) | OFLAG_COPIED
            set_l2_entry(table, index + i, extended, entry, ALL_ALLOCATED)
            if not allocation.reused:
                self.allocator.drop(host_clusters(geometry, old))
        self.l2_cache.mark_dirty(table_offset)
        self._locations_changed()

    async def _l2_for_write(self, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table for ``l1_index``, allocated (or copied, if shared) as needed."""
        entry = self.l1[l1_index]
        offset = entry & OFFSET_MASK
        if offset and entry & OFLAG_COPIED:
            found = await self._l2_table(l1_index)
            assert found is not None
            return found
        if offset:  # shared with a snapshot: copy it. Its clusters are counted once for
            # each L1 table that reaches them, so the copy adds no reference; the old table
            # loses the active L1's reference once the new one is durable
            self.geometry.check_cluster(offset, "L2 table")
            table = array("Q", await self.l2_tables.load(offset))
        else:
            table = array("Q", bytes(self.cluster_size))
        new = await self.allocator.allocate(1)
        self.l2_cache.put(new, table, dirty=True)
        await self.l2_tables.evict()
        self.l1[l1_index] = new | OFLAG_COPIED
        self.l1_table.dirty.add(l1_index)
        if offset:
            self.allocator.drop((offset,))
        return new, table

    # -- zeroing and discard ----------------------------------------------------------------

    def _settled(self, offset: int, length: int) -> Settled:
        """The lock, once no allocation in flight overlaps the range: a change of its
        clusters comes after the data and L2 entries of those."""
        return Settled(
            self.lock, self.allocations, offset - offset % self.cluster_size, offset + length
        )

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        async with self._settled(offset, length):
            await self._changing()
            await self._zero(offset, length, unmap, write=True)

    async def discard(self, offset: int, length: int) -> None:
        """Whole clusters only: discard is advisory."""
        async with self._settled(offset, length):
            await self._changing()
            await self._zero(offset, length, unmap=True, write=False)

    def _whole_cluster(self, position: int, chunk: int) -> bool:
        return chunk == self.cluster_size or (
            position % self.cluster_size == 0 and position + chunk == self.header.size
        )

    async def _zero(self, offset: int, length: int, unmap: bool, write: bool) -> None:
        """The whole clusters in the range get zero entries (lock held), their host clusters
        freed with ``unmap`` and kept without (as QEMU's zero_in_l2_slice). What an entry
        cannot cover (parts of clusters, and what :func:`zeroed_entry` leaves to written
        zeros) is written as zeros, if ``write``. Clusters that read as zeros already are left
        as they are (with ``unmap``, unless they hold a host cluster), so zeroing a sparse
        image allocates no L2 table."""
        cluster = self.cluster_size
        position, end = offset, offset + length
        while position < end:
            chunk = min(end - position, cluster - position % cluster)
            whole = self._whole_cluster(position, chunk)
            if (
                not await self._reads_zeros(position, chunk, unmapped=unmap and whole)
                and not (whole and await self._zero_cluster(position, unmap))
                and write
            ):
                await self._write_locked(position, memoryview(bytes(chunk)))
            position += chunk

    async def _zero_cluster(self, position: int, unmap: bool) -> bool:
        """Give the cluster at ``position`` a zero entry, if the image has one for it."""
        l1_index, index = self.geometry.l1_index(position), self.geometry.l2_index(position)
        extended = self.geometry.extended_l2
        found = await self._l2_table(l1_index)
        old = l2_entry(found[1], index, extended)[0] if found else 0
        new = zeroed_entry(self.geometry, self.header.version, bool(self.backing_size), old, unmap)
        if new is None:
            return False
        table_offset, table = await self._l2_for_write(l1_index)
        old, _ = l2_entry(table, index, extended)  # the same entry, in a copied table
        set_l2_entry(table, index, extended, *new)
        self.l2_cache.mark_dirty(table_offset)
        if not new[0] & OFFSET_MASK:  # else it kept the host cluster old holds
            self.allocator.drop(host_clusters(self.geometry, old))
        self._locations_changed()
        return True

    async def _reads_zeros(self, offset: int, length: int, unmapped: bool = False) -> bool:
        """Whether the range reads as zeros without holding any data (lock held); with
        ``unmapped``, also without holding a host cluster."""
        return all(
            (
                mapping.kind is Kind.ZERO
                or (mapping.kind is Kind.UNALLOCATED and not self.backing_size)
            )
            and not (unmapped and mapping.host)
            for _, _, mapping in await self._extents(offset, length)
        )

    # -- write-back -------------------------------------------------------------------------

    async def _write_back(self) -> bool:
        """Everything cached reaches the image (lock held), then freed clusters' space goes
        back to the host if it may. True if that ended with a flush of the image file."""
        wrote = await self.metadata.write_back()
        await self._release_freed()
        return wrote

    async def _release_freed(self) -> None:
        """Give freed clusters' space back to the host and the clusters to the allocator
        for reuse (after a write-back: their freeing is durable), unless a request in flight
        may still use one it mapped before the cluster was dropped (they then wait for a
        later write-back, at the latest close). Cached tables at a freed cluster go (QEMU's
        qcow2_cache_discard): a write-back must never reach a reused cluster."""
        if self.in_flight:
            return
        freed, self.allocator.freed = self.allocator.freed, []
        for start, length in host_runs(freed, self.cluster_size):
            await self.file.discard(start, length)
        for host in freed:
            self.l2_cache.pop(host)
            self.metadata.refcount_blocks.tables.pop(host)
        self.allocator.reuse(freed)

    async def flush(self) -> None:
        async with self.lock:
            if not await self._write_back():
                await self.file.flush()
