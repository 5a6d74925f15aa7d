"""The qcow2 format driver: reads everything qemu-img 7.2 writes, writes crash-safely.

Ground rules:

* Metadata (L2 tables, refcount blocks) lives in bounded write-back caches. It reaches the
  image in the order a crash at any moment needs (DESIGN.md section 6, QEMU's cache
  dependencies): guest data and refcount blocks first, then an fsync barrier, then the L2
  tables and L1 entries that reference new clusters, then another barrier, and only then the
  refcount decreases for clusters those tables no longer reference. A crash (or kill -9) at
  any point therefore leaves at worst leaked clusters, never a reference to a cluster
  without a refcount.
* New clusters are appended at the end of the image and freed clusters are never reused while
  the image is open; their space is returned to the host (hole punching) once no durable
  metadata references them. So a read that mapped a cluster just before a concurrent discard
  never sees another cluster's data.
* One metadata lock per image serialises mapping changes. Reads and in-place writes map
  from cached L2 tables without it (no await, so nothing interleaves) and take it only
  to load a table; either way they hold it only while mapping, never during data I/O.
"""

from __future__ import annotations

import errno
import os
import sys
import zlib
from array import array
from typing import Any, BinaryIO, Mapping

import trio
import zstandard

from blkfs.block import (IMAGE, BlockDriver, BlockError, Child, ChildSpec, Extent, Option,
                         Role, Status)
from drivers.qcow2.cache import TableCache
from drivers.qcow2.check import check_child, repair_on_open
from drivers.qcow2.create import write_image
from drivers.qcow2.format import (COMPRESSION_NAMES, COMPRESSION_ZSTD, INCOMPAT_CORRUPT,
                                  INCOMPAT_DIRTY, INCOMPAT_KNOWN, INCOMPAT_NAMES, MAGIC,
                                  MAX_L1_BYTES, MAX_REFTABLE_BYTES, V2_HEADER, FormatError,
                                  Header, feature_list, parse_header)
from drivers.qcow2.layout import (ALL_ALLOCATED, ALL_ZERO, OFFSET_MASK, OFLAG_COMPRESSED,
                                  OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS, Geometry, Kind, Mapping,
                                  data_run, decode, fully_allocated, get_refcount,
                                  refcount_entries, set_refcount)

DEFAULT_CACHE = 8 << 20
UNALLOCATED = Mapping(Kind.UNALLOCATED)
BIG_ENDIAN = sys.byteorder == "big"


def _decode_table(data: bytes | bytearray) -> array:
    table = array("Q", data)
    if not BIG_ENDIAN:
        table.byteswap()
    return table


def _encode_table(table: array) -> bytes:
    if BIG_ENDIAN:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


def corrupt(message: str) -> BlockError:
    return BlockError(errno.EIO, f"qcow2: corrupt image: {message}")


class Qcow2Driver(BlockDriver):
    name = "qcow2"
    is_format = True
    options = {
        "l2-cache-size": Option("size", DEFAULT_CACHE, "memory for cached L2 tables"),
        "refcount-cache-size": Option("size", DEFAULT_CACHE // 4,
                                      "memory for cached refcount blocks"),
    }
    children = {
        "file": ChildSpec(help="the image file", role=IMAGE),
        "backing": ChildSpec(required=False, auto=False, role=Role.COW,
                             help="the backing image (default: as the header names it; "
                                  "null for none)"),
    }

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header[:4] == MAGIC else 0

    @classmethod
    def create(cls, file: BinaryIO, size: int, options: Mapping[str, str],
               backing: str | None, backing_format: str | None) -> None:
        write_image(file, size, options, backing, backing_format)

    @classmethod
    async def check(cls, file: Child, repair: bool) -> dict[str, Any]:
        return await check_child(file, repair)

    # -- open and close ---------------------------------------------------------------------

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.file = self.child("file")
        self.lock = trio.Lock()
        self.readers = 0
        """Reads in flight: they may have mapped a cluster that a write has since dropped,
        so freed clusters are punched only while there are none."""
        self.backing_size = 0
        await self._load_metadata(self.node.read_only, values)
        if "backing" in children:  # the user's choice: options, a node name, or None
            await self._open_backing(children["backing"])
        elif self.header.backing_file:
            await self._open_backing(self._backing_options(self.header.backing_file))

    async def _read_header(self) -> Header:
        head = bytes(await self.file.read(0, min(self.file.node.size, 4096)))
        try:
            header = parse_header(head)
            if header.cluster_size > len(head):
                header = parse_header(bytes(await self.file.read(
                    0, min(self.file.node.size, header.cluster_size))))
        except FormatError as exc:
            raise BlockError(errno.EINVAL, f"qcow2: {exc}") from None
        return header

    async def _load_metadata(self, read_only: bool, values: Mapping[str, Any]) -> None:
        """Header, tables and empty caches from the image (at open, and when a read-only
        node turns writable: another program may have written the image meanwhile)."""
        header = await self._read_header()
        self._check_features(header, writable=not read_only)
        self.header = header
        self.geometry = Geometry(header.cluster_bits, header.extended_l2)
        self.cluster_size = header.cluster_size
        self.l1 = await self._load_l1(header)
        self.reftable = await self._load_reftable(header)
        if not read_only:
            await repair_on_open(self.file)
        self.refblock_entries = refcount_entries(header.cluster_bits, header.refcount_order)
        cluster = self.cluster_size
        self.l2_cache: TableCache[array] = TableCache(values["l2-cache-size"] // cluster)
        self.refcount_cache: TableCache[bytearray] = TableCache(
            values["refcount-cache-size"] // cluster)
        self.next_free = -(-self.file.node.size // cluster) * cluster
        self.dirty_l1: set[int] = set()
        self.reftable_dirty = False
        self.freed: list[int] = []
        self.dropped: list[int] = []
        """Host clusters whose reference was dropped in cached metadata; their refcounts
        fall once metadata without the reference is on disk."""

    def _check_features(self, header: Header, writable: bool) -> None:
        unknown = header.incompatible_features & ~INCOMPAT_KNOWN
        if header.crypt_method:
            raise BlockError(errno.ENOTSUP, "qcow2: encrypted images are not supported")
        if unknown:
            names = [header.feature_names.get((0, bit), INCOMPAT_NAMES.get(bit, f"bit {bit}"))
                     for bit in range(64) if unknown >> bit & 1]
            raise BlockError(errno.ENOTSUP, "qcow2: unsupported incompatible features: "
                                            + ", ".join(names))
        if writable and header.incompatible_features & INCOMPAT_CORRUPT:
            raise BlockError(errno.EROFS, "qcow2: the image is marked corrupt; open it "
                                          "read-only, or repair it with qemu-img check -r all")
        if writable and header.incompatible_features & INCOMPAT_DIRTY:
            raise BlockError(errno.EROFS, "qcow2: the image was not closed cleanly (dirty "
                                          "bit of lazy refcounts); open it read-only, or "
                                          "repair it with qemu-img check -r all")
        if header.size > 1 << 61:
            raise BlockError(errno.EINVAL, f"qcow2: virtual size {header.size} is too large")

    def _check_offset(self, offset: int, what: str) -> None:
        if offset % self.cluster_size or offset < self.cluster_size:
            raise corrupt(f"{what} at offset {offset} is not a valid cluster")

    async def _load_l1(self, header: Header) -> array:
        if header.l1_size * 8 > MAX_L1_BYTES:
            raise corrupt(f"L1 table of {header.l1_size} entries is too large")
        if header.l1_size < self.geometry.l1_size_for(header.size):
            raise corrupt(f"L1 table of {header.l1_size} entries cannot map "
                          f"{header.size} bytes")
        if not header.l1_size:
            return array("Q")
        self._check_offset(header.l1_table_offset, "L1 table")
        self._check_in_file(header.l1_table_offset, header.l1_size * 8, "L1 table")
        return _decode_table(await self.file.read(header.l1_table_offset, header.l1_size * 8))

    async def _load_reftable(self, header: Header) -> array:
        length = header.refcount_table_clusters * self.cluster_size
        if not length or length > MAX_REFTABLE_BYTES:
            raise corrupt(f"refcount table of {header.refcount_table_clusters} clusters")
        self._check_offset(header.refcount_table_offset, "refcount table")
        self._check_in_file(header.refcount_table_offset, length, "refcount table")
        return _decode_table(await self.file.read(header.refcount_table_offset, length))

    def _check_in_file(self, offset: int, length: int, what: str) -> None:
        if offset + length > self.file.node.size:
            raise corrupt(f"{what} at {offset}+{length} lies past the end of the file")

    async def _open_backing(self, backing: Any) -> None:
        if backing is None:
            return
        edge = await self.node.open_child("backing", backing, Role.COW)
        self.backing_size = edge.node.size

    def _backing_options(self, name: str) -> dict[str, Any]:
        """Options for the backing file the header names: relative to the overlay's
        directory, read-only, through the graph (so --image-dir applies), format from the
        header extension or probed."""
        base = self.file.node.filename()
        if base and not os.path.isabs(name):
            name = os.path.join(os.path.dirname(base), name)
        options: dict[str, Any] = {"file": {"driver": "file", "filename": name},
                                   "read-only": True}
        if self.header.backing_format:
            options["driver"] = self.header.backing_format
        return options

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """Cache sizes stay; read-only may change: writing back first when it turns on,
        loading and checking the image as a writable open does when it turns off. The image
        must still be the one this node describes (same geometry and backing file)."""
        await super().reopen(values)
        if values["read-only"] == self.node.read_only:
            return
        async with self.lock:
            if values["read-only"]:
                await self._write_back()
                return
            old = self.header
            new = await self._read_header()
            if (new.cluster_bits, new.extended_l2, new.backing_file, new.size) != \
                    (old.cluster_bits, old.extended_l2, old.backing_file, old.size):
                raise BlockError(errno.EBUSY, "qcow2: the image was changed by another "
                                              "program while read-only here; change the "
                                              "medium to use it writable")
            await self._load_metadata(False, values)

    async def close(self) -> None:
        if not self.node.read_only:
            async with self.lock:
                await self._write_back()

    async def length(self) -> int:
        return self.header.size

    # -- mapping ----------------------------------------------------------------------------

    async def _load(self, cache: TableCache, offset: int, decode_table: bool) -> Any:
        """A metadata cluster from the cache or the image (lock held)."""
        table = cache.get(offset)
        if table is not None:
            return table
        self._check_in_file(offset, self.cluster_size, "metadata cluster")
        data = await self.file.read(offset, self.cluster_size)
        table = _decode_table(data) if decode_table else data
        cache.put(offset, table)
        await self._evict(cache)
        return table

    async def _l2_table(self, l1_index: int) -> tuple[int, array] | None:
        entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
        offset = entry & OFFSET_MASK
        if not offset:
            return None
        self._check_offset(offset, "L2 table")
        return offset, await self._load(self.l2_cache, offset, True)

    def _entry(self, table: array, index: int) -> tuple[int, int]:
        if self.geometry.extended_l2:
            return table[2 * index], table[2 * index + 1]
        return table[index], 0

    def _set_entry(self, table: array, index: int, entry: int, bitmap: int) -> None:
        if self.geometry.extended_l2:
            table[2 * index] = entry
            table[2 * index + 1] = bitmap
        else:
            table[index] = entry

    async def _extents(self, offset: int, length: int) -> list[tuple[int, int, Mapping]]:
        """The request cut into (guest offset, length, mapping), contiguous host data merged
        (lock held: L2 tables are loaded as needed)."""
        extents: list[tuple[int, int, Mapping]] = []
        end = offset + length
        while offset < end:
            found = await self._l2_table(self.geometry.l1_index(offset))
            offset = self._map_table(extents, offset, end, found[1] if found else None)
        return extents

    def _cached_extents(self, offset: int, length: int) -> list[tuple[int, int, Mapping]] | None:
        """As :meth:`_extents` from cached L2 tables only, or None if one is not cached.

        It never awaits, so it needs no lock: trio switches tasks only at an await, so no
        mapping change can interleave, and a writer holding the lock is between whole steps
        (each L2 entry is either old or new, and new ones point at data already written)."""
        extents: list[tuple[int, int, Mapping]] = []
        end = offset + length
        while offset < end:
            table = self._cached_l2(self.geometry.l1_index(offset))
            if table is False:
                return None
            offset = self._map_table(extents, offset, end, table)
        return extents

    def _cached_l2(self, l1_index: int) -> array | None | bool:
        """The cached L2 table for ``l1_index``; None if there is none, False if not cached."""
        entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
        if not entry & OFFSET_MASK:
            return None
        table = self.l2_cache.get(entry & OFFSET_MASK)
        return False if table is None else table

    def _map_table(self, extents: list[tuple[int, int, Mapping]], offset: int, end: int,
                   table: array | None) -> int:
        """Append the mappings of ``offset`` up to ``end`` or the end of the range ``table``
        (the L2 table of ``offset``, or None) maps; return where that stopped."""
        geometry = self.geometry
        cluster_size = self.cluster_size
        unit = geometry.subcluster_size
        shift = geometry.l1_shift
        stop = min(end, ((offset >> shift) + 1) << shift)
        while offset < stop:
            span = min(unit - offset % unit, stop - offset)
            if table is None:
                mapping = UNALLOCATED
            else:
                index = geometry.l2_index(offset)
                entry, bitmap = self._entry(table, index)
                mapping = decode(entry, bitmap, geometry, (offset % cluster_size) // unit)
                if mapping.kind is Kind.NORMAL:
                    self._check_offset(mapping.host, "data cluster")
                    if not geometry.extended_l2 and offset + span < stop:
                        more = -(-(stop - offset - span) // cluster_size)
                        run = data_run(table, index + 1, index + 1 + more,
                                       mapping.host + cluster_size, cluster_size)
                        span = min(stop - offset, span + run * cluster_size)
            if extents:
                last_off, last_len, last = extents[-1]
                kind = mapping.kind
                if (kind is last.kind and kind is not Kind.COMPRESSED and
                        (kind is not Kind.NORMAL or
                         mapping.host + offset % cluster_size ==
                         last.host + (last_off % cluster_size) + last_len)):
                    extents[-1] = (last_off, last_len + span, last)
                    offset += span
                    continue
            extents.append((offset, span, mapping))
            offset += span
        return offset

    # -- reading ----------------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        self.readers += 1
        try:
            extents = self._cached_extents(offset, buf.nbytes)
            if extents is None:
                async with self.lock:
                    extents = await self._extents(offset, buf.nbytes)
            await self._read_extents(offset, buf, extents)
        finally:
            self.readers -= 1

    async def _read_extents(self, start: int, buf: memoryview,
                            extents: list[tuple[int, int, Mapping]]) -> None:
        cluster_size = self.cluster_size
        for guest, length, mapping in extents:
            view = buf[guest - start:guest - start + length]
            kind = mapping.kind
            if kind is Kind.NORMAL:
                host = mapping.host + guest % cluster_size
                self._check_in_file(host, length, "data")
                await self.file.readinto(host, view)
            elif kind is Kind.UNALLOCATED and guest < self.backing_size:
                inside = min(length, self.backing_size - guest)
                await self.child("backing").readinto(guest, view[:inside])
                if inside < length:  # a backing file shorter than this image
                    view[inside:] = bytes(length - inside)
            elif kind is Kind.COMPRESSED:
                data = await self._decompress(mapping)
                within = guest % cluster_size
                view[:] = data[within:within + length]
            else:
                view[:] = bytes(length)

    async def _decompress(self, mapping: Mapping) -> bytes:
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
            raise corrupt(f"compressed cluster at {mapping.host} decompresses to {len(out)} "
                          "bytes")
        return out[:self.cluster_size]

    # -- writing ----------------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview) -> None:
        runs = self._cached_in_place(offset, data.nbytes)
        if runs is None:
            async with self.lock:
                await self._write_locked(offset, data)
            return
        done = 0
        for host, length in runs:  # no mapping changes: no lock (see _cached_extents)
            await self.file.write(host, data[done:done + length])
            done += length

    def _cached_in_place(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """(host offset, length) runs for a write that lands wholly in allocated clusters
        of cached, unshared L2 tables; None if anything must be allocated or loaded."""
        runs: list[tuple[int, int]] = []
        end = offset + length
        while offset < end:
            l1_index = self.geometry.l1_index(offset)
            entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
            table = self.l2_cache.get(entry & OFFSET_MASK) if entry & OFLAG_COPIED else None
            run = None if table is None else self._in_place_run(offset, end, table)
            if run is None:
                return None
            runs.append(run)
            offset += run[1]
        return runs

    def _in_place_run(self, offset: int, end: int, table: array) -> tuple[int, int] | None:
        """(host offset, length) of the longest run from ``offset`` towards ``end`` that
        ``table`` maps to allocated clusters, contiguous on the host; None if the first
        cluster cannot be written in place."""
        geometry, cluster = self.geometry, self.cluster_size
        index = geometry.l2_index(offset)
        entry, bitmap = self._entry(table, index)
        if not fully_allocated(entry, bitmap, geometry):
            return None
        self._check_offset(entry & OFFSET_MASK, "data cluster")
        host = (entry & OFFSET_MASK) + offset % cluster
        length = min(end - offset, cluster - offset % cluster)
        while offset + length < end and index + 1 < geometry.l2_entries:
            index += 1
            entry, bitmap = self._entry(table, index)
            if (not fully_allocated(entry, bitmap, geometry) or
                    entry & OFFSET_MASK != host + length):
                break
            length += min(end - offset - length, cluster)
        return host, length

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        end = offset + data.nbytes
        position = offset
        while position < end:
            table_offset, table = await self._l2_for_write(self.geometry.l1_index(position))
            run = self._in_place_run(position, end, table)
            if run is not None:
                host, chunk = run
                await self.file.write(host, data[position - offset:position - offset + chunk])
            else:
                chunk = await self._write_allocating(position, end, data[position - offset:],
                                                     table_offset, table,
                                                     self.geometry.l2_index(position))
            position += chunk

    async def _write_allocating(self, position: int, end: int, data: memoryview,
                                table_offset: int, table: array, index: int) -> int:
        """Write into new clusters: as many consecutive ones of this L2 table as the request
        covers. Only the first may be partial (the loop takes further clusters only whole);
        it is merged with its old contents, and the rest is written straight from ``data``."""
        cluster = self.cluster_size
        start = position - position % cluster
        count = 1
        while (index + count < self.geometry.l2_entries and start + (count + 1) * cluster <= end
               and not fully_allocated(*self._entry(table, index + count), self.geometry)):
            count += 1
        head, tail = position - start, min(end, start + count * cluster) - start
        host = await self._allocate(count)
        whole_from = 0
        if head or tail < cluster:
            whole_from = min(tail, cluster)
            await self._write_merged(start, host, head, data[:whole_from - head])
        if whole_from < tail:
            await self.file.write(host + whole_from, data[whole_from - head:tail - head])
        for i in range(count):
            old, _ = self._entry(table, index + i)
            self._set_entry(table, index + i, (host + i * cluster) | OFLAG_COPIED,
                            ALL_ALLOCATED)
            self._release(old)
        self.l2_cache.mark_dirty(table_offset)
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
                await self._read_extents(start + lo, view[lo:hi],
                                         await self._extents(start + lo, hi - lo))
        view[within:edge] = data
        await self.file.write(host, view)

    async def _l2_for_write(self, l1_index: int) -> tuple[int, array]:
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
            self._check_offset(offset, "L2 table")
            table = array("Q", await self._load(self.l2_cache, offset, True))
        else:
            table = array("Q", bytes(self.cluster_size))
        new = await self._allocate(1)
        self.l2_cache.put(new, table, dirty=True)
        await self._evict(self.l2_cache)
        self.l1[l1_index] = new | OFLAG_COPIED
        self.dirty_l1.add(l1_index)
        if offset:
            self.dropped.append(offset)
        return new, table

    def _release(self, entry: int) -> None:
        """Drop the reference an L2 entry held on its host cluster(s), once durable."""
        self.dropped.extend(self._host_clusters(entry))

    def _host_clusters(self, entry: int) -> range:
        if entry & OFLAG_COMPRESSED:
            host, length = self.geometry.compressed_range(entry & ~(OFLAG_COPIED |
                                                                    OFLAG_COMPRESSED))
            return range(host - host % self.cluster_size, host + length, self.cluster_size)
        host = entry & OFFSET_MASK
        return range(host, host + 1 if host else host, self.cluster_size)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        async with self.lock:
            await self._zero_clusters(offset, length)
            position, end = offset, offset + length
            zero_entry = self._zero_entry() is not None
            while position < end:  # what a zero entry cannot cover: parts of clusters, or
                # whole ones of a v2 image over a backing file
                chunk = min(end - position, self.cluster_size - position % self.cluster_size)
                covered = zero_entry and self._whole_cluster(position, chunk)
                if not covered and not await self._reads_zeros(position, chunk):
                    await self._write_locked(position, memoryview(bytes(chunk)))
                position += chunk

    async def discard(self, offset: int, length: int) -> None:
        """Whole clusters only: discard is advisory."""
        async with self.lock:
            await self._zero_clusters(offset, length)

    def _whole_cluster(self, position: int, chunk: int) -> bool:
        return chunk == self.cluster_size or (position % self.cluster_size == 0 and
                                              position + chunk == self.header.size)

    async def _reads_zeros(self, offset: int, length: int) -> bool:
        """Whether the range reads as zeros without holding any data (lock held)."""
        return all(mapping.kind is Kind.ZERO or
                   (mapping.kind is Kind.UNALLOCATED and not self.backing_size)
                   for _, _, mapping in await self._extents(offset, length))

    async def _zero_clusters(self, offset: int, length: int) -> None:
        """The whole clusters in the range become zero clusters, their host clusters freed
        (lock held): the zero flag (v3), or unallocated where no backing file shows through
        (v2), as QEMU's discard_in_l2_slice. Clusters that read as zeros already are left
        as they are, so zeroing a sparse image allocates no L2 table."""
        cluster = self.cluster_size
        end = offset + length
        position = offset
        while position < end:
            chunk = min(end - position, cluster - position % cluster)
            new = self._zero_entry() if self._whole_cluster(position, chunk) else None
            if new is not None and not await self._reads_zeros(position, chunk):
                table_offset, table = await self._l2_for_write(
                    self.geometry.l1_index(position))
                index = self.geometry.l2_index(position)
                old, _ = self._entry(table, index)
                self._set_entry(table, index, *new)
                self.l2_cache.mark_dirty(table_offset)
                self._release(old)
            position += chunk

    def _zero_entry(self) -> tuple[int, int] | None:
        """(entry, bitmap) that reads as zeros with no host cluster, if the image has one."""
        if self.geometry.extended_l2:
            return 0, ALL_ZERO
        if self.header.version >= 3:
            return OFLAG_ZERO, 0
        return (0, 0) if not self.backing_size else None

    async def truncate(self, length: int) -> None:
        if length < self.header.size:
            raise BlockError(errno.ENOTSUP, "qcow2: images can grow but not shrink")
        async with self.lock:
            needed = self.geometry.l1_size_for(length)
            if needed > len(self.l1):
                await self._grow_l1(needed)
            self.header.size = length
            await self._write_back()
            await self._write_header()

    # -- allocation and refcounts -----------------------------------------------------------

    async def _allocate(self, count: int) -> int:
        """``count`` new contiguous clusters at the end of the image, refcounted."""
        host = self.next_free
        self.next_free += count * self.cluster_size
        for i in range(count):
            await self._update_refcount(host + i * self.cluster_size, 1)
        return host

    async def _update_refcount(self, host: int, delta: int) -> None:
        cluster = host // self.cluster_size
        block_index, index = divmod(cluster, self.refblock_entries)
        if block_index >= len(self.reftable):
            await self._grow_reftable(block_index + 1)
        block_offset = self.reftable[block_index] & OFFSET_MASK
        if not block_offset:
            block_offset = await self._new_refblock(block_index)
        self._check_offset(block_offset, "refcount block")
        block = await self._load(self.refcount_cache, block_offset, False)
        order = self.header.refcount_order
        value = get_refcount(block, index, order) + delta
        if value < 0:
            raise corrupt(f"refcount of cluster {cluster} would drop below zero")
        try:
            set_refcount(block, index, order, value)
        except OverflowError:
            raise BlockError(errno.ENOSPC, f"qcow2: refcount of cluster {cluster} would "
                             f"exceed {self.header.refcount_bits} bits") from None
        self.refcount_cache.mark_dirty(block_offset)
        if value == 0:
            self.freed.append(host)

    async def _new_refblock(self, block_index: int) -> int:
        """A new refcount block at the end of the image; it counts itself where it can."""
        host = self.next_free
        self.next_free += self.cluster_size
        self.refcount_cache.put(host, bytearray(self.cluster_size), dirty=True)
        self.reftable[block_index] = host
        self.reftable_dirty = True
        await self._update_refcount(host, 1)
        await self._evict(self.refcount_cache)
        return host

    async def _grow_reftable(self, entries: int) -> None:
        """Move the refcount table to a larger place at the end; durable before the header
        points to it, and the old table is freed only after."""
        cluster = self.cluster_size
        clusters = -(-max(entries, 2 * len(self.reftable)) * 8 // cluster)
        if clusters * cluster > MAX_REFTABLE_BYTES:
            raise BlockError(errno.EFBIG, "qcow2: the refcount table would exceed its limit")
        old_offset, old_clusters = (self.header.refcount_table_offset,
                                    self.header.refcount_table_clusters)
        host = self.next_free
        self.next_free += clusters * cluster
        self.reftable.extend([0] * (clusters * cluster // 8 - len(self.reftable)))
        self.header.refcount_table_offset, self.header.refcount_table_clusters = host, clusters
        for i in range(clusters):
            await self._update_refcount(host + i * cluster, 1)
        await self._write_refcounts(force_table=True)
        await self._barrier_after_refcounts()
        await self._write_header()
        for i in range(old_clusters):
            await self._update_refcount(old_offset + i * cluster, -1)

    async def _grow_l1(self, entries: int) -> None:
        cluster = self.cluster_size
        if entries * 8 > MAX_L1_BYTES:
            raise BlockError(errno.EFBIG, "qcow2: the L1 table would exceed its limit")
        old_offset, old_size = self.header.l1_table_offset, len(self.l1)
        clusters = -(-entries * 8 // cluster)
        host = await self._allocate(clusters)
        self.l1.extend([0] * (entries - len(self.l1)))
        await self._write_back()
        await self.file.write(host, _encode_table(self.l1) + bytes(clusters * cluster -
                                                                   entries * 8))
        await self.file.flush()
        self.header.l1_table_offset, self.header.l1_size = host, entries
        self.dirty_l1.clear()
        await self._write_header()
        for i in range(-(-old_size * 8 // cluster)):
            await self._update_refcount(old_offset + i * cluster, -1)

    # -- write-back -------------------------------------------------------------------------

    async def _evict(self, cache: TableCache) -> None:
        while (victim := cache.victim()) is not None:
            if victim in cache.dirty:
                if cache is self.l2_cache:
                    await self._write_refcounts()
                    await self._barrier_after_refcounts()
                if cache is self.refcount_cache and self.reftable_dirty:
                    await self._write_refcounts()  # the table may name other new blocks
                else:
                    await self._write_table(cache, victim)
            cache.pop(victim)

    async def _write_table(self, cache: TableCache, offset: int) -> None:
        """Write a cached table; it stays dirty until a barrier after the write succeeds
        (a failed flush may have dropped the write from the host's cache)."""
        table = cache.get(offset)
        data = _encode_table(table) if isinstance(table, array) else table
        await self.file.write(offset, data)

    async def _write_refcounts(self, force_table: bool = False) -> None:
        """Refcount blocks, then (after a barrier, as it may point at new blocks) the
        refcount table; clean once a barrier after them succeeds."""
        for offset, _ in self.refcount_cache.dirty_items():
            await self._write_table(self.refcount_cache, offset)
        if self.reftable_dirty or force_table:
            await self.file.flush()
            await self.file.write(self.header.refcount_table_offset,
                                  _encode_table(self.reftable))

    async def _barrier_after_refcounts(self) -> None:
        written = [offset for offset, _ in self.refcount_cache.dirty_items()]
        await self.file.flush()
        self.refcount_cache.clean(written)
        self.reftable_dirty = False

    async def _write_back(self) -> bool:
        """Everything cached reaches the image in crash-safe order (lock held), each kind
        after a barrier: refcounts, then the L2 tables that use the clusters they count,
        then the L1 entries that point to those tables, then the refcount decreases of
        clusters no durable table references any more. True if that ended with a flush of
        the image file."""
        if not (self.l2_cache.dirty or self.dirty_l1 or self.refcount_cache.dirty or
                self.reftable_dirty or self.dropped):
            await self._punch_freed()
            return False
        await self._write_refcounts()
        await self._barrier_after_refcounts()
        tables = [offset for offset, _ in self.l2_cache.dirty_items()]
        for offset in tables:
            await self._write_table(self.l2_cache, offset)
        if self.dirty_l1:
            await self.file.flush()  # a new L2 table is on disk before an L1 entry names it
            self.l2_cache.clean(tables)
            for index in sorted(self.dirty_l1):
                await self.file.write(self.header.l1_table_offset + index * 8,
                                      self.l1[index].to_bytes(8, "big"))
        await self.file.flush()
        self.l2_cache.clean(tables)
        self.dirty_l1.clear()
        if self.dropped:  # no durable metadata references these any more
            dropped, self.dropped = self.dropped, []
            for host in dropped:
                await self._update_refcount(host, -1)
            await self._write_refcounts()
            await self._barrier_after_refcounts()
        await self._punch_freed()
        return True

    async def _punch_freed(self) -> None:
        """Give freed clusters' space back to the host, unless a read in flight may still
        read one it mapped before the cluster was dropped (it then waits for a later
        write-back, at the latest close)."""
        if self.readers:
            return
        freed, self.freed = self.freed, []
        for host in freed:
            await self.file.discard(host, self.cluster_size)

    async def _write_header(self) -> None:
        header = self.header
        await self.file.write(0, V2_HEADER.pack(
            MAGIC, header.version, header.backing_file_offset, header.backing_file_size,
            header.cluster_bits, header.size, header.crypt_method, header.l1_size,
            header.l1_table_offset, header.refcount_table_offset,
            header.refcount_table_clusters, header.nb_snapshots, header.snapshots_offset))
        await self.file.flush()

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
            offset, min(total, self.backing_size - offset))
        return Extent(below.length, below.status & ~Status.ALLOCATED)

    def _status(self, mapping: Mapping) -> Status | None:
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
