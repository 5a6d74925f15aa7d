"""The metadata cache: qcow2 metadata in memory, written back in the order its kinds declare.

Reference: QEMU block/qcow2-cache.c. Ground rules:

* Each kind of metadata (refcount blocks, the refcount table, L2 tables, L1 entries, and the
  deferred refcount decreases in :mod:`blkfs_drivers.qcow2.refcount`) is a :class:`WriteBack` that
  names what must be durable before its own entries are written: ``depends_on``, QEMU's
  ``qcow2_cache_set_dependency``, and ``depends_on_flush``, QEMU's
  ``qcow2_cache_depends_on_flush`` (guest data written outside the cache must be durable
  first). Writing a kind back writes what it depends on, then a barrier, then its own dirty
  entries. The order is declared once, where the kinds are made
  (:class:`blkfs_drivers.qcow2.metadata.Metadata`), and nothing else names it.
* A barrier is a flush of the image file. An entry is marked clean only after a barrier that
  follows its write succeeded; after a failed flush every entry stays dirty, since the host may
  have dropped the write (fsyncgate).
* :class:`TableCache` is the pure part: an LRU of tables by host offset and the dirty set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from .imagefile import ImageFile
from .mapping import corrupt
from .ondisk import Header, encode_entry, encode_table

T = TypeVar("T")


class TableCache(Generic[T]):
    """LRU of tables by host offset, at most ``capacity`` of them, and which are dirty."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 2)
        self._tables: OrderedDict[int, T] = OrderedDict()
        self._newest: int | None = None
        """The most recently used table's offset: getting it again needs no reordering, and
        one L2 table maps every cluster of a small image's reads."""
        self.dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, offset: int) -> T | None:
        table = self._tables.get(offset)
        if table is not None and offset != self._newest:
            self._tables.move_to_end(offset)
            self._newest = offset
        return table

    def put(self, offset: int, table: T, dirty: bool = False) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        self._newest = offset
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def clean(self, offsets: list[int]) -> None:
        """These tables' writes are durable (a barrier after them succeeded)."""
        self.dirty.difference_update(offsets)

    def victim(self) -> int | None:
        """The least recently used table if the cache is over capacity, else None."""
        if len(self._tables) <= self.capacity:
            return None
        return next(iter(self._tables))

    def pop(self, offset: int) -> T | None:
        if offset == self._newest:
            self._newest = None
        self.dirty.discard(offset)
        return self._tables.pop(offset, None)

    def dirty_items(self) -> list[tuple[int, T]]:
        return [(offset, self._tables[offset]) for offset in sorted(self.dirty)]


class Barrier:
    """Flushes of the image file, after which what was written before them is clean."""

    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self.kinds: list[WriteBack] = []

    async def __call__(self) -> None:
        written = [(kind, kind.take_written()) for kind in self.kinds]
        await self.file.flush()
        for kind, keys in written:
            kind.clean(keys)


class WriteBack(ABC):
    """Metadata of one kind that reaches the image by write-back, after what it depends on."""

    def __init__(
        self, barrier: Barrier, depends_on: WriteBack | None = None, depends_on_flush: bool = False
    ) -> None:
        self.barrier = barrier
        self.depends_on = depends_on
        """Written back, and followed by a barrier, before any entry of this kind is written
        (QEMU's qcow2_cache_set_dependency)."""
        self.depends_on_flush = depends_on_flush
        """A barrier precedes this kind's write-back even when nothing it depends on was
        written: its entries point at guest data that is written outside the cache (QEMU's
        qcow2_cache_depends_on_flush)."""
        self._written: list[int] = []
        """Keys of entries written since the last barrier."""
        barrier.kinds.append(self)

    @abstractmethod
    def pending(self) -> bool:
        """Whether anything of this kind waits to be written."""

    @abstractmethod
    async def write_dirty(self) -> None:
        """Write every dirty entry, noting each in ``_written``."""

    @abstractmethod
    def clean(self, keys: list[int]) -> None:
        """A barrier after the writes of these entries succeeded."""

    def take_written(self) -> list[int]:
        written, self._written = self._written, []
        return written

    async def write_back(self) -> None:
        """Write what is dirty here, after what this kind depends on."""
        await self.after_dependencies(self.pending())
        await self.write_dirty()

    async def after_dependencies(self, writing: bool) -> None:
        """Write back what this kind depends on, then the barrier that must come between
        those writes and this kind's (if it is ``writing`` anything, or always with
        ``depends_on_flush``)."""
        if self.depends_on is not None:
            await self.depends_on.write_back()
        if self.depends_on_flush or (writing and self.depends_on is not None):
            await self.barrier()


class CachedTables(WriteBack, Generic[T]):
    """Cluster-sized tables (L2 tables, refcount blocks) in a bounded cache by host offset,
    decoded as they are loaded."""

    def __init__(
        self,
        barrier: Barrier,
        file: ImageFile,
        capacity: int,
        cluster_size: int,
        decode: Callable[[bytes | bytearray], T],
        encode: Callable[[T], bytes | bytearray],
        depends_on: WriteBack | None = None,
        depends_on_flush: bool = False,
    ) -> None:
        super().__init__(barrier, depends_on, depends_on_flush)
        self.file = file
        self.tables: TableCache[T] = TableCache(capacity)
        self.cluster_size = cluster_size
        self.decode = decode
        self.encode = encode

    def pending(self) -> bool:
        return bool(self.tables.dirty)

    async def write_dirty(self) -> None:
        for offset, table in self.tables.dirty_items():
            await self.file.write(offset, self.encode(table))
            self._written.append(offset)

    def clean(self, keys: list[int]) -> None:
        self.tables.clean(keys)

    async def load(self, offset: int) -> T:
        """The table at host ``offset``, from the cache or the image (metadata lock held)."""
        table = self.tables.get(offset)
        if table is not None:
            return table
        if offset + self.cluster_size > self.file.size:
            raise corrupt(
                f"metadata cluster at {offset}+{self.cluster_size} lies past the end of the file"
            )
        table = self.decode(await self.file.read(offset, self.cluster_size))
        self.tables.put(offset, table)
        await self.evict()
        return table

    async def evict(self) -> None:
        """Drop tables over the capacity, least recently used first; a dirty one is written
        first, after what it depends on."""
        while (victim := self.tables.victim()) is not None:
            if victim in self.tables.dirty:
                await self.after_dependencies(True)
                table = self.tables.get(victim)
                assert table is not None
                await self.file.write(victim, self.encode(table))
            if victim in self._written:
                self._written.remove(victim)
            self.tables.pop(victim)


class RefcountTable(WriteBack):
    """The refcount table, written where the header says it lies: ``entries`` up to the
    last one in use (those past it are zeros on disk, and stay so until an entry there is
    set, which extends ``entries``); the table's room is the header's."""

    def __init__(
        self,
        barrier: Barrier,
        file: ImageFile,
        header: Header,
        entries: array[int],
        depends_on: WriteBack,
    ) -> None:
        super().__init__(barrier, depends_on)
        self.file = file
        self.header = header
        self.entries = entries
        self.dirty = False

    @property
    def room(self) -> int:
        """Entries the table has on disk."""
        return self.header.refcount_table_clusters * self.header.cluster_size // 8

    def pending(self) -> bool:
        return self.dirty

    async def write_dirty(self) -> None:
        if self.dirty:
            await self.file.write(self.header.refcount_table_offset, encode_table(self.entries))
            self._written.append(0)

    def clean(self, keys: list[int]) -> None:
        if keys:
            self.dirty = False


class L1Table(WriteBack):
    """The active L1 table; a dirty entry is written on its own (eight bytes, which a disk
    writes whole), each naming one L2 table."""

    def __init__(
        self,
        barrier: Barrier,
        file: ImageFile,
        header: Header,
        entries: array[int],
        depends_on: WriteBack,
    ) -> None:
        super().__init__(barrier, depends_on)
        self.file = file
        self.header = header
        self.entries = entries
        self.dirty: set[int] = set()

    def pending(self) -> bool:
        return bool(self.dirty)

    async def write_dirty(self) -> None:
        for index in sorted(self.dirty):
            await self.file.write(
                self.header.l1_table_offset + index * 8, encode_entry(self.entries[index])
            )
            self._written.append(index)

    def clean(self, keys: list[int]) -> None:
        self.dirty.difference_update(keys)

    async def move(self, host: int) -> None:
        """Write the whole table to its new place at ``host`` (cluster aligned, allocated)
        and flush; the header then names it there, and no entry is dirty."""
        data = encode_table(self.entries)
        await self.file.write(host, data + bytes(-len(data) % self.header.cluster_size))
        await self.file.flush()
        self.header.l1_table_offset, self.header.l1_size = host, len(self.entries)
        self.dirty.clear()
