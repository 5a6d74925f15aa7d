"""The qcow2 driver's changing requests: writes (in place and allocating), zeroing,
discard, and the write-back that makes them durable."""

from __future__ import annotations

from array import array

from blkfs.block import BlockError, WriteFlags
from blkfs.block.driver import Located

from .mapped import MappedImage
from .mapping import (
    ALL_ALLOCATED,
    OFFSET_MASK,
    OFLAG_COPIED,
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


class WritableImage(MappedImage):
    """Writes, zeroing, discard and write-back over the mapped image."""

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
            async with self.lock:
                await self._changing()
                await self._write_locked(offset, data)
            return
        done = 0
        self.in_flight += 1
        try:
            for host, length in runs:  # no mapping changes: no lock (see _cached_extents)
                await self.file.write(host, data[done : done + length])
                done += length
        finally:
            self.in_flight -= 1

    def locate(self, offset: int, length: int, *, write: bool = False) -> Located | None:
        """For a write: one run of allocated, unshared clusters that it may overwrite in
        place (as :meth:`write` does with no lock); the caller writes the range alone, so
        nothing frees them meanwhile. Else as :meth:`MappedImage.locate`."""
        if not write:
            return super().locate(offset, length)
        runs = None if self.header.autoclear_features else self._cached_in_place(offset, length)
        return Located(self.file, runs[0][0]) if runs is not None and len(runs) == 1 else None

    def _cached_in_place(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """(host offset, length) runs for a write that lands wholly in allocated clusters
        of cached, unshared L2 tables; None if anything must be allocated or loaded."""
        runs: list[tuple[int, int]] = []
        end = offset + length
        geometry, l1, cache = self.geometry, self.l1, self.l2_cache
        while offset < end:
            l1_index = geometry.l1_index(offset)
            entry = l1[l1_index] if l1_index < len(l1) else 0
            table = cache.get(entry & OFFSET_MASK) if entry & OFLAG_COPIED else None
            run = None if table is None else in_place_run(geometry, table, offset, end)
            if run is None:
                return None
            runs.append(run)
            offset += run[1]
        return runs

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        end = offset + data.nbytes
        position = offset
        while position < end:
            table_offset, table = await self._l2_for_write(self.geometry.l1_index(position))
            run = in_place_run(self.geometry, table, position, end)
            if run is not None:
                host, chunk = run
                await self.file.write(host, data[position - offset : position - offset + chunk])
            else:
                chunk = await self._write_allocating(
                    position, end, data[position - offset :], table_offset, table
                )
            position += chunk

    async def _write_allocating(
        self, position: int, end: int, data: memoryview, table_offset: int, table: array[int]
    ) -> int:
        """Write into new clusters: as many consecutive ones of this L2 table as the request
        covers. Only the first may be partial (further clusters are taken only whole); it is
        merged with its old contents, and the rest is written straight from ``data``. A
        cluster that keeps an unshared host cluster (zeroed without unmap) is written there
        instead, alone: its L2 entry reads zeros until the new one is written back after the
        data, as a new cluster's does."""
        cluster = self.cluster_size
        extended = self.geometry.extended_l2
        index = self.geometry.l2_index(position)
        start = position - position % cluster
        reused = reusable_host(l2_entry(table, index, extended)[0])
        if reused:  # a zeroed cluster that kept its host cluster: no new space
            self.geometry.check_cluster(reused, "data cluster")
            count, host = 1, reused
        else:
            host, count = await self.allocator.allocate_run(
                allocation_run(self.geometry, table, index, start, end)
            )
        head, tail = position - start, min(end, start + count * cluster) - start
        whole_from = 0
        try:
            if head or tail < cluster:
                whole_from = min(tail, cluster)
                await self._write_merged(start, host, head, data[: whole_from - head])
            if whole_from < tail:
                await self.file.write(host + whole_from, data[whole_from - head : tail - head])
        except BlockError:  # nothing points to the new clusters: free them (no leak)
            self.allocator.drop(host + i * cluster for i in range(count))
            raise
        for i in range(count):
            old, _ = l2_entry(table, index + i, extended)
            set_l2_entry(
                table, index + i, extended, (host + i * cluster) | OFLAG_COPIED, ALL_ALLOCATED
            )
            if not reused:
                self.allocator.drop(host_clusters(self.geometry, old))
        self.l2_cache.mark_dirty(table_offset)
        self._locations_changed()
        return tail - head

    async def _write_merged(self, start: int, host: int, within: int, data: memoryview) -> None:
        """Write the guest cluster at ``start`` to the new cluster ``host``: ``data`` at
        ``within``, and around it only the old bytes the write does not cover (QEMU's COW
        regions), so a small write over a backing file reads little of it."""
        merged = bytearray(self.cluster_size)
        view = memoryview(merged)
        edge = within + data.nbytes
        for lo, hi in ((0, within), (edge, self.cluster_size)):
            if lo < hi:
                await self._read_extents(
                    start + lo, view[lo:hi], await self._extents(start + lo, hi - lo)
                )
        view[within:edge] = data
        await self.file.write(host, view)

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

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        async with self.lock:
            await self._changing()
            await self._zero(offset, length, unmap, write=True)

    async def discard(self, offset: int, length: int) -> None:
        """Whole clusters only: discard is advisory."""
        async with self.lock:
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
