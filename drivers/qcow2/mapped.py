"""The qcow2 driver's view of a mapped image: cluster mapping, reads, locate and block
status over the metadata an open image holds (see :mod:`drivers.qcow2.driver` for the ground
rules all of its parts keep)."""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Callable

import trio
import zstandard

from blkfs.block import BlockDriver, Child, Extent, Status
from blkfs.block.driver import Located

from .backing_map import BackingMap, Route
from .cache import CachedTables, L1Table, TableCache
from .mapping import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    ClusterMapping,
    Extents,
    Geometry,
    Kind,
    corrupt,
    decode,
    in_place_run,
    map_table,
)
from .metadata import Metadata
from .ondisk import COMPRESSION_ZSTD, Header
from .refcount import RefcountAllocator


class MappedImage(BlockDriver):
    """What every part of the driver shares: the open image's state, its mapping, and the
    requests that only read it."""

    file: Child
    lock: trio.Lock
    in_flight: int
    backing_size: int
    below: BackingMap
    _location_watchers: set[Callable[[], None]]
    metadata: Metadata
    header: Header
    geometry: Geometry
    cluster_size: int
    allocator: RefcountAllocator
    l1_table: L1Table
    l1: array[int]
    l2_tables: CachedTables[array[int]]
    l2_cache: TableCache[array[int]]

    # -- mapping ----------------------------------------------------------------------------

    async def _l2_table(self, l1_index: int) -> tuple[int, array[int]] | None:
        """The L2 table of ``l1_index`` and its host offset, None if it has none (lock
        held: it may be loaded)."""
        entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
        offset = entry & OFFSET_MASK
        if not offset:
            return None
        self.geometry.check_cluster(offset, "L2 table")
        return offset, await self.l2_tables.load(offset)

    async def _extents(self, offset: int, length: int) -> Extents:
        """The request mapped (lock held: L2 tables are loaded as needed)."""
        extents: Extents = []
        end = offset + length
        while offset < end:
            found = await self._l2_table(self.geometry.l1_index(offset))
            offset = map_table(extents, self.geometry, offset, end, found[1] if found else None)
        return extents

    def _cached_extents(self, offset: int, length: int) -> Extents | None:
        """As :meth:`_extents` from cached L2 tables only, or None if one is not cached.

        It never awaits, so it needs no lock: trio switches tasks only at an await, so no
        mapping change can interleave, and a writer holding the lock is between whole steps
        (each L2 entry is either old or new, and new ones point at data already written)."""
        extents: Extents = []
        end = offset + length
        geometry, l1, cache = self.geometry, self.l1, self.l2_cache
        while offset < end:
            l1_index = geometry.l1_index(offset)
            entry = l1[l1_index] & OFFSET_MASK if l1_index < len(l1) else 0
            table = None
            if entry:
                table = cache.get(entry)
                if table is None:
                    return None
            offset = map_table(extents, geometry, offset, end, table)
        return extents

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

    # -- reading ----------------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        self.in_flight += 1
        try:
            extents = self._cached_extents(offset, buf.nbytes)
            if extents is None:
                async with self.lock:
                    extents = await self._extents(offset, buf.nbytes)
            await self._read_extents(offset, buf, extents)
        finally:
            self.in_flight -= 1

    async def _read_extents(self, start: int, buf: memoryview, extents: Extents) -> None:
        cluster_size = self.cluster_size
        for guest, length, mapping in extents:
            view = buf[guest - start : guest - start + length]
            kind = mapping.kind
            if kind is Kind.NORMAL:
                host = mapping.host + guest % cluster_size
                self._check_in_file(host, length, "data")
                await self.file.readinto(host, view)
            elif kind is Kind.UNALLOCATED and guest < self.backing_size:
                inside = min(length, self.backing_size - guest)
                await self._read_backing(guest, view[:inside])
                if inside < length:  # a backing file shorter than this image
                    view[inside:] = bytes(length - inside)
            elif kind is Kind.COMPRESSED:
                data = await self._decompress(mapping)
                within = guest % cluster_size
                view[:] = data[within : within + length]
            else:
                view[:] = bytes(length)

    def _below(self, guest: int, length: int) -> tuple[Route, int] | None:
        """Where the backing chain holds the ``length`` bytes at ``guest`` (one cluster at
        most): the route and the host offset of ``guest``, from the backing map (learnt now
        if it can be); None if the range crosses a cluster or the chain cannot say."""
        bits = self.geometry.cluster_bits
        cluster = guest >> bits
        if (guest + length - 1) >> bits != cluster:
            return None
        found = self.below.entries.get(cluster)
        if found is None:
            start = cluster << bits
            found = self.below.learn(
                cluster,
                self.child("backing"),
                start,
                min(start + self.cluster_size, self.backing_size) - start,
            )
            if found is None:
                return None
        return found[0], found[1] + guest - (cluster << bits)

    async def _read_backing(self, guest: int, view: memoryview) -> None:
        """Read from the backing chain: in one step where the backing map knows (or can
        learn at once) which layer holds the cluster, else through the backing file's
        request path (a read across clusters, a chain that cannot say, a drained layer)."""
        found = self._below(guest, view.nbytes)
        if found is not None:
            route, host = found
            if route.enter():
                try:
                    if route.file is None:
                        view[:] = bytes(view.nbytes)
                    else:
                        await route.file.readinto(host, view)
                finally:
                    route.leave()
                return
        await self.child("backing").readinto(guest, view)

    def locate(self, offset: int, length: int, *, write: bool = False) -> Located | None:
        """From cached L2 tables only: one run of data in the image file, zeros, or what
        the backing chain says for a range this image leaves to it; for a write, one run of
        allocated, unshared clusters it may overwrite in place (as :meth:`write` does with no
        lock: the caller writes the range alone, so nothing frees them meanwhile).

        Every read's short path asks this first (:meth:`Node.read_now`), so a range inside
        one cluster of a standard L2 table, every 4 KiB read's, is answered from its one
        entry, with no call on the way to a data cluster (a read's whole cost in the block
        layer is a few of them). An entry that is not plainly valid is left to the request
        path, which reports the corruption."""
        if write:
            runs = None if self.header.autoclear_features else self._cached_in_place(offset, length)
            return Located(self.file, runs[0][0]) if runs is not None and len(runs) == 1 else None
        geometry = self.geometry
        bits = geometry.cluster_bits
        if geometry.extended_l2 or (offset ^ (offset + length - 1)) >> bits:
            extents = self._cached_extents(offset, length)
            if extents is None or len(extents) != 1:
                return None
            return self._located(extents[0][2], offset, length)
        try:
            table_offset = self.l1[offset >> geometry.l1_shift] & OFFSET_MASK
        except IndexError:  # an L1 table shorter than the image is refused at open
            return None
        if not table_offset:
            return self._located_below(offset, length)
        table = self.l2_cache.get(table_offset)
        if table is None:
            return None
        entry = table[(offset >> bits) & (geometry.l2_entries - 1)]
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO):
            return self._located(decode(entry, 0, geometry, 0), offset, length)
        cluster = entry & OFFSET_MASK
        if not cluster:
            return self._located_below(offset, length)
        within = geometry.cluster_size - 1
        host = cluster + (offset & within)
        if cluster & within or cluster <= within or host + length > self.file.node.size:
            return None
        return Located(self.file, host)

    def _located(self, mapping: ClusterMapping, offset: int, length: int) -> Located | None:
        """:meth:`locate` of a read that ``mapping`` maps whole."""
        kind = mapping.kind
        if kind is Kind.NORMAL:
            host = mapping.host + offset % self.cluster_size
            return Located(self.file, host) if host + length <= self.file.node.size else None
        if kind is Kind.UNALLOCATED:
            return self._located_below(offset, length)
        return Located(None, 0) if kind is Kind.ZERO else None

    def _located_below(self, offset: int, length: int) -> Located | None:
        """:meth:`locate` of a read this image leaves to its backing chain (zeros past its
        end): from the backing map, or as the backing file's driver tells."""
        if offset >= self.backing_size:
            return Located(None, 0)
        if offset + length > self.backing_size:
            return None
        found = self._below(offset, length)
        if found is not None:
            route, host = found
            return Located(route.file, host, route.passed)
        backing = self.child("backing")
        below = backing.node.driver.locate(offset, length)
        if below is None:
            return None
        return Located(below.child, below.offset, (backing.node, *below.passed))

    def watch_locations(self, changed: Callable[[], None]) -> None:
        self._location_watchers.add(changed)

    def unwatch_locations(self, changed: Callable[[], None]) -> None:
        self._location_watchers.discard(changed)

    def _locations_changed(self) -> None:
        """The mapping, the backing file or the size changed: what :meth:`locate` said
        may not hold any more."""
        if self._location_watchers:
            watchers, self._location_watchers = self._location_watchers, set()
            for changed in watchers:
                changed()

    def _check_in_file(self, offset: int, length: int, what: str) -> None:
        if offset + length > self.file.node.size:
            raise corrupt(f"{what} at {offset}+{length} lies past the end of the file")

    async def _decompress(self, mapping: ClusterMapping) -> bytes:
        length = min(mapping.length, self.file.node.size - mapping.host)
        if length <= 0:
            raise corrupt(f"compressed cluster at {mapping.host} lies past the end of the file")
        data = bytes(await self.file.read(mapping.host, length))
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            else:
                out = zlib.decompressobj(-15).decompress(data, self.cluster_size)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise corrupt(f"compressed cluster at {mapping.host}: {exc}") from None
        if len(out) < self.cluster_size:
            raise corrupt(f"compressed cluster at {mapping.host} decompresses to {len(out)} bytes")
        return out[: self.cluster_size]

    # -- status ---------------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        """What this image holds for a prefix of the range; where it leaves the range to
        its backing file, what the backing chain holds there, not allocated here (QEMU's
        bdrv_co_block_status_above), so a sparse copy of an overlay skips the base's holes."""
        async with self.lock:
            extents = await self._extents(offset, length)
        status = self._status(extents[0][2])
        total = 0
        for _, span, mapping in extents:
            if self._status(mapping) != status:
                break
            total += span
        if status is not None:
            return Extent(total, status)
        if offset >= self.backing_size:  # past a shorter backing file: zeros
            return Extent(total, Status.ZERO)
        below = await self.child("backing").block_status(
            offset, min(total, self.backing_size - offset)
        )
        return Extent(below.length, below.status & ~Status.ALLOCATED)

    def _status(self, mapping: ClusterMapping) -> Status | None:
        """The status of a mapping, or None where the backing file decides."""
        if mapping.kind in (Kind.NORMAL, Kind.COMPRESSED):
            return Status.DATA | Status.ALLOCATED
        if mapping.kind is Kind.ZERO:
            return Status.ZERO | Status.ALLOCATED
        return None if self.backing_size else Status.ZERO
