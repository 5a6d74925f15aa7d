"""The qcow2 format driver: its requests (reads, in-place and allocating writes, zeroing,
discard, growth, block status) over the pieces of this package.

Ground rules:

* Mapping is pure (:mod:`drivers.qcow2.mapping`), clusters and refcounts come from the
  allocator (:mod:`drivers.qcow2.refcount`), and metadata reaches the image through the
  metadata cache in the order :mod:`drivers.qcow2.metadata` declares. So a crash (or kill -9)
  at any point leaves at worst leaked clusters, never a reference to a cluster without a
  refcount, and guest data is durable before the L2 entry that points to it.
* One metadata lock per image serialises mapping changes. Reads and in-place writes map from
  cached L2 tables without it (no await, so nothing interleaves) and take it only to load a
  table; either way they hold it only while mapping, never during data I/O.
* A freed cluster's space goes back to the host, and the cluster to the allocator for
  reuse, only after a write-back made its freeing durable and while no request that maps
  without the lock is in flight: a read or an in-place write may have mapped the cluster
  just before it was dropped.
* These paths are the hot ones: reads and in-place writes keep per-cluster values in locals
  and make no objects but the mappings they return.
"""

from __future__ import annotations

import errno
import os
import zlib
from array import array
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, BinaryIO

import trio
import zstandard

from blkfs.block import (
    IMAGE,
    BlockDriver,
    BlockError,
    Child,
    ChildSpec,
    Extent,
    Option,
    Role,
    Status,
)
from blkfs.block.driver import Located
from blkfs.block.options import nbd_uri

from .backing_map import BackingMap
from .check import check_child, repair_on_open
from .create import write_image
from .imagefile import ChildFile, read_header, write_header
from .mapping import (
    ALL_ALLOCATED,
    OFFSET_MASK,
    OFLAG_COPIED,
    ClusterMapping,
    Extents,
    Kind,
    allocation_run,
    corrupt,
    host_clusters,
    host_runs,
    in_place_run,
    l2_entry,
    map_table,
    reusable_host,
    set_l2_entry,
    zeroed_entry,
)
from .metadata import Metadata
from .ondisk import (
    COMPRESSION_NAMES,
    COMPRESSION_ZSTD,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_L1_BYTES,
    feature_list,
)

DEFAULT_CACHE = 8 << 20


class Qcow2Driver(BlockDriver):
    name = "qcow2"
    is_format = True
    options = {
        "l2-cache-size": Option("size", DEFAULT_CACHE, "memory for cached L2 tables"),
        "refcount-cache-size": Option(
            "size", DEFAULT_CACHE // 4, "memory for cached refcount blocks"
        ),
        "repair": Option(
            "enum",
            "off",
            "check the image at a writable open and repair "
            "leaked clusters (refusing a corrupt image)",
            choices=("off", "leaks"),
        ),
    }
    children = {
        "file": ChildSpec(help="the image file", role=IMAGE),
        "backing": ChildSpec(
            required=False,
            auto=False,
            role=Role.COW,
            help="the backing image (default: as the header names it; null for none)",
        ),
    }

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header[:4] == MAGIC else 0

    @classmethod
    def create(
        cls,
        file: BinaryIO,
        size: int,
        options: Mapping[str, str],
        backing: str | None,
        backing_format: str | None,
    ) -> None:
        write_image(file, size, options, backing, backing_format)

    @classmethod
    async def check(cls, file: Child, repair: bool) -> dict[str, Any]:
        return await check_child(file, repair)

    # -- open and close ---------------------------------------------------------------------

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.file = self.child("file")
        self.lock = trio.Lock()
        self.in_flight = 0
        """Reads and in-place writes in flight (and direct reads of overlays through this
        image, see BackingMap): each may have mapped a cluster that has since been dropped,
        so freed clusters are punched and reused only while there are none."""
        self.backing_size = 0
        self.below = BackingMap(Qcow2Driver)
        """Where the backing chain holds the clusters this image leaves to it."""
        self._location_watchers: set[Callable[[], None]] = set()
        await self._load(not self.node.read_only, values)
        if "backing" in children:  # the user's choice: options, a node name, or None
            await self._open_backing(children["backing"])
        elif self.header.backing_file:
            await self._open_backing(self._backing_options(self.header.backing_file))

    async def _load(self, writable: bool, values: Mapping[str, Any]) -> None:
        """The image's metadata (at open, and when a read-only node turns writable: another
        program may have written the image meanwhile); with ``repair=leaks``, a writable
        open checks the image first (QEMU checks only with its repair option as well)."""
        metadata = await Metadata.load(
            ChildFile(self.file), writable, values["l2-cache-size"], values["refcount-cache-size"]
        )
        if writable and values["repair"] == "leaks":
            await repair_on_open(self.file)
        self._locations_changed()  # another program may have changed the image meanwhile
        self.metadata = metadata
        self.header = metadata.header
        self.geometry = metadata.geometry
        self.cluster_size = metadata.header.cluster_size
        self.discard_granularity = self.cluster_size  # discard frees whole clusters only
        self.allocator = metadata.allocator
        self.l1_table = metadata.l1_table
        self.l1 = metadata.l1_table.entries
        self.l2_tables = metadata.l2_tables
        self.l2_cache = metadata.l2_tables.tables

    async def _open_backing(self, backing: dict[str, Any] | str | None) -> None:
        if backing is None:
            return
        edge = await self.node.open_child("backing", backing, Role.COW)
        self.backing_size = edge.node.size

    def _backing_options(self, name: str) -> dict[str, Any]:
        """Options for the backing file the header names: relative to the overlay's
        directory, read-only, through the graph (so --image-dir applies), format from the
        header extension or probed; with the image file's cache.direct, as QEMU's backing
        files inherit it. An NBD URI names an nbd node, as in QEMU, which the mount's
        network policy (--allow-nbd with --image-dir) admits or refuses."""
        file = nbd_uri(name)
        if file is None:
            base = self.file.node.filename()
            if base and not os.path.isabs(name):
                name = os.path.join(os.path.dirname(base), name)
            file = {"driver": "file", "filename": name}
            if self.file.node.values.get("cache.direct"):
                file["cache.direct"] = True
        options: dict[str, Any] = {"file": file, "read-only": True}
        if self.header.backing_format:
            options["driver"] = self.header.backing_format
        return options

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """Cache sizes stay; read-only may change: writing back first when it turns on,
        loading the image as a writable open does when it turns off. The image must still be
        the one this node describes (same geometry and backing file)."""
        await super().reopen(values)
        if values["read-only"] == self.node.read_only:
            return
        async with self.lock:
            if values["read-only"]:
                await self._write_back()
                return
            old = self.header
            new, _ = await read_header(self.metadata.file)
            if (new.cluster_bits, new.extended_l2, new.backing_file, new.size) != (
                old.cluster_bits,
                old.extended_l2,
                old.backing_file,
                old.size,
            ):
                raise BlockError(
                    errno.EBUSY,
                    "qcow2: the image was changed by another "
                    "program while read-only here; change the "
                    "medium to use it writable",
                )
            await self._load(True, values)

    async def close(self) -> None:
        self.below.clear()
        self._locations_changed()
        if not self.node.read_only:
            async with self.lock:
                await self._write_back()

    async def length(self) -> int:
        """The image's size; asked again when sizes are refreshed (children first), which
        is when a backing node that changed size since is noted, so that reads past its
        old end see what it holds now (QEMU's qcow2 asks bdrv_getlength of its backing)."""
        backing = self.node.children.get("backing")
        size = backing.node.size if backing is not None else 0
        if size != self.backing_size:
            self.backing_size = size
            self.below.clear()
            self._locations_changed()
        return self.header.size

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

    async def _read_backing(self, guest: int, view: memoryview) -> None:
        """Read from the backing chain: in one step where the backing map knows (or can
        learn at once) which layer holds the cluster, else through the backing file's
        request path (a read across clusters, a chain that cannot say, a drained layer)."""
        bits = self.geometry.cluster_bits
        cluster = guest >> bits
        if (guest + view.nbytes - 1) >> bits == cluster:
            found = self.below.entries.get(cluster)
            if found is None:
                start = cluster << bits
                found = self.below.learn(
                    cluster,
                    self.child("backing"),
                    start,
                    min(start + self.cluster_size, self.backing_size) - start,
                )
            if found is not None:
                route, host = found
                if route.enter():
                    try:
                        if route.file is None:
                            view[:] = bytes(view.nbytes)
                        else:
                            await route.file.readinto(host + guest - (cluster << bits), view)
                    finally:
                        route.leave()
                    return
        await self.child("backing").readinto(guest, view)

    def locate(self, offset: int, length: int) -> Located | None:
        """From cached L2 tables only: one run of data in the image file, zeros, or what
        the backing chain says for a range this image leaves to it."""
        extents = self._cached_extents(offset, length)
        if extents is None or len(extents) != 1:
            return None
        mapping = extents[0][2]
        kind = mapping.kind
        if kind is Kind.NORMAL:
            host = mapping.host + offset % self.cluster_size
            if host + length > self.file.node.size:
                return None  # the request path reports the corruption
            return Located(self.file, host)
        if kind is Kind.ZERO or (kind is Kind.UNALLOCATED and offset >= self.backing_size):
            return Located(None, 0)
        if kind is Kind.UNALLOCATED and offset + length <= self.backing_size:
            backing = self.child("backing")
            below = backing.node.driver.locate(offset, length)
            if below is not None:
                return Located(below.child, below.offset, (backing.node, *below.passed))
        return None

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

    # -- writing ----------------------------------------------------------------------------

    async def _changing(self) -> None:
        """Before the image's first change (lock held): autoclear bits cleared, since blkfs
        maintains none of what they vouch for (Metadata.clear_autoclear)."""
        if self.header.autoclear_features:
            await self.metadata.clear_autoclear()

    async def write(self, offset: int, data: memoryview) -> None:
        runs = (
            None if self.header.autoclear_features else self._cached_in_place(offset, data.nbytes)
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

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
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

    async def make_empty(self) -> None:
        """Every guest cluster becomes unallocated, its host cluster freed, so the image
        shows its backing file again (QEMU's qcow2_make_empty with full discard; the L2
        tables stay). The freeing follows the usual barrier: L2 tables first."""
        if self.node.read_only:  # before anything changes, even in memory
            raise BlockError(errno.EROFS, f"node '{self.node.name}' is read-only")
        extended = self.geometry.extended_l2
        async with self.lock:
            await self._changing()
            for l1_index, entry in enumerate(self.l1):
                if not entry & OFFSET_MASK:
                    continue
                table_offset, table = await self._l2_for_write(l1_index)
                for index in range(self.geometry.l2_entries):
                    old, _ = l2_entry(table, index, extended)
                    set_l2_entry(table, index, extended, 0, 0)
                    self.allocator.drop(host_clusters(self.geometry, old))
                self.l2_cache.mark_dirty(table_offset)
                self._locations_changed()
            await self._write_back()
            await self.file.flush()

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the first cluster naming the new backing file (QEMU's
        qcow2_change_backing_file); extensions blkfs does not know are kept."""
        if name is not None and len(name.encode()) > MAX_BACKING_NAME:
            raise BlockError(
                errno.ENAMETOOLONG,
                f"qcow2: a backing file name is at most {MAX_BACKING_NAME} bytes",
            )
        async with self.lock:
            trial = replace(self.header)
            trial.set_backing(name, fmt)
            if trial.pack_cluster() is None:
                raise BlockError(
                    errno.ENAMETOOLONG,
                    "qcow2: the backing file name does not fit in the first cluster",
                )
            await self._changing()
            self.header.set_backing(name, fmt)
            head = self.header.pack_cluster()
            assert head is not None  # what _changing drops only makes room
            if not await self._write_back():  # what the new backing file covers is
                await self.file.flush()  # durable before the header names it
            await self.file.write(0, memoryview(head))
            await self.file.flush()

    def children_changed(self) -> None:
        backing = self.node.children.get("backing")
        self.backing_size = backing.node.size if backing is not None else 0
        self.below.clear()
        self._locations_changed()

    # -- growing ----------------------------------------------------------------------------

    async def truncate(self, length: int) -> None:
        if length < self.header.size:
            raise BlockError(errno.ENOTSUP, "qcow2: images can grow but not shrink")
        async with self.lock:
            await self._changing()
            needed = self.geometry.l1_size_for(length)
            if needed > len(self.l1):
                await self._grow_l1(needed)
            self.header.size = length
            self._locations_changed()
            await self._write_back()
            await write_header(self.metadata.file, self.header)

    async def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place at the end (QEMU's qcow2_grow_l1_table):
        everything cached written back first, the new table durable before the header names
        it, and the old table's clusters freed after."""
        cluster = self.cluster_size
        if entries * 8 > MAX_L1_BYTES:
            raise BlockError(errno.EFBIG, "qcow2: the L1 table would exceed its limit")
        old_offset, old_size = self.header.l1_table_offset, len(self.l1)
        host = await self.allocator.allocate(-(-entries * 8 // cluster))
        self.l1.extend([0] * (entries - len(self.l1)))
        await self._write_back()
        await self.l1_table.move(host)
        await write_header(self.metadata.file, self.header)
        for i in range(-(-old_size * 8 // cluster)):
            await self.allocator.update_refcount(old_offset + i * cluster, -1)

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

    def info(self) -> dict[str, Any]:
        header = self.header
        return {
            "compat": "1.1" if header.version >= 3 else "0.10",
            "cluster-size": header.cluster_size,
            "refcount-bits": header.refcount_bits,
            "compression-type": COMPRESSION_NAMES[header.compression_type],
            "extended-l2": header.extended_l2,
            "backing-filename": header.backing_file,
            "backing-format": header.backing_format,
            "features": feature_list(header),
        }
