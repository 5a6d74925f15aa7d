"""The metadata cache (:mod:`blkfs_drivers.qcow2.cache`): the LRU against a model, and the
write-back order the metadata kinds declare, over a file in memory that records every write
and barrier.
"""

from __future__ import annotations

import errno
from array import array

import pytest
import trio
from blkfs_drivers.qcow2.cache import Barrier, TableCache, WriteBack
from blkfs_drivers.qcow2.check import check
from blkfs_drivers.qcow2.create import build_header, empty_image
from blkfs_drivers.qcow2.mapping import OFFSET_MASK, OFLAG_COPIED
from blkfs_drivers.qcow2.metadata import Metadata
from blkfs_drivers.qcow2.ondisk import decode_table
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError

FAST = settings(max_examples=60, deadline=None)


# -- TableCache -----------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 9), st.booleans()),
        st.tuples(st.just("get"), st.integers(0, 9), st.just(False)),
        st.tuples(st.just("dirty"), st.integers(0, 9), st.just(False)),
        st.tuples(st.just("pop"), st.integers(0, 9), st.just(False)),
        st.tuples(st.just("evict"), st.just(0), st.just(False)),
    ),
    max_size=60,
)


@FAST
@given(st.integers(-3, 6), ops)
def test_table_cache_behaves_like_an_lru_list(
    capacity: int, steps: list[tuple[str, int, bool]]
) -> None:
    """Against a model: a recency list (oldest first), the tables and the dirty set."""
    cache: TableCache[str] = TableCache(capacity)
    assert cache.capacity == max(capacity, 2)
    order: list[int] = []
    tables: dict[int, str] = {}
    dirty: set[int] = set()
    for n, (op, offset, flag) in enumerate(steps):
        if op == "put":
            cache.put(offset, f"t{n}", dirty=flag)
            order = [o for o in order if o != offset] + [offset]
            tables[offset] = f"t{n}"
            dirty |= {offset} if flag else set()
        elif op == "get":
            assert cache.get(offset) == tables.get(offset)
            if offset in tables:
                order = [o for o in order if o != offset] + [offset]
        elif op == "dirty" and offset in tables:
            cache.mark_dirty(offset)
            dirty.add(offset)
        elif op == "pop":
            assert cache.pop(offset) == tables.pop(offset, None)
            order = [o for o in order if o != offset]
            dirty.discard(offset)
        elif op == "evict":  # what the driver does: write back and drop victims in turn
            while (victim := cache.victim()) is not None:
                assert victim == order[0]
                cache.pop(victim)
                del tables[order.pop(0)]
                dirty.discard(victim)
            assert len(cache) <= cache.capacity
        assert len(cache) == len(order)
        assert cache.victim() == (order[0] if len(order) > cache.capacity else None)
        assert cache.dirty_items() == [(o, tables[o]) for o in sorted(dirty)]


@FAST
@given(st.integers(2, 8), st.integers(0, 8))
def test_table_cache_names_no_victim_until_over_capacity(capacity: int, extra: int) -> None:
    cache: TableCache[int] = TableCache(capacity)
    for offset in range(capacity):
        cache.put(offset, offset)
        assert cache.victim() is None
    for offset in range(capacity, capacity + extra):
        cache.put(offset, offset)
        assert cache.victim() == offset - capacity
        cache.pop(offset - capacity)
    assert len(cache) == capacity


@FAST
@given(st.integers(2, 6))
def test_a_get_saves_a_table_from_eviction(capacity: int) -> None:
    cache: TableCache[int] = TableCache(capacity)
    for offset in range(capacity):
        cache.put(offset, offset)
    assert cache.get(0) == 0
    cache.put(capacity, capacity)
    assert cache.victim() == 1


@FAST
@given(st.integers(0, 9))
def test_a_clean_put_does_not_hide_an_unwritten_change(offset: int) -> None:
    cache: TableCache[bytes] = TableCache(4)
    cache.put(offset, b"new", dirty=True)
    cache.put(offset, b"newer")
    assert cache.dirty_items() == [(offset, b"newer")]


# -- write-back order -----------------------------------------------------------------------


class RecordingFile:
    """An image file in memory that records its writes, barriers and discards, and fails the
    flushes it is told to."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.ops: list[tuple[str, int]] = []
        self.fail_flush: set[int] = set()
        """Which flushes (counting from 0) fail."""
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytearray:
        return bytearray(self.data[offset : offset + length].ljust(length, b"\0"))

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(data)] = data
        self.ops.append(("write", offset))

    async def flush(self) -> None:
        number, self.flushes = self.flushes, self.flushes + 1
        if number in self.fail_flush:
            self.ops.append(("failed barrier", 0))
            raise BlockError(errno.EIO, "flush failed")
        self.ops.append(("barrier", 0))

    async def discard(self, offset: int, length: int) -> None:
        self.ops.append(("discard", offset))


async def new_metadata(
    cluster_size: str = "4k", l2_tables: int = 8, refcount_blocks: int = 8
) -> tuple[RecordingFile, Metadata]:
    header = build_header(64 << 20, {"cluster_size": cluster_size}, None, None)
    file = RecordingFile(empty_image(header))
    cluster = header.cluster_size
    return file, await Metadata.load(file, True, l2_tables * cluster, refcount_blocks * cluster)


def names(file: RecordingFile, metadata: Metadata) -> list[str]:
    """The recorded operations, named by what they wrote."""
    header = metadata.header
    l2 = set(metadata.l2_tables.tables.dirty) | {
        entry & OFFSET_MASK for entry in metadata.l1_table.entries
    }
    out = []
    for op, offset in file.ops:
        if op != "write":
            out.append(op)
        elif offset == 0:
            out.append("header")
        elif offset == header.refcount_table_offset:
            out.append("refcount table")
        elif header.l1_table_offset <= offset < header.l1_table_offset + header.l1_size * 8:
            out.append(f"L1 entry {(offset - header.l1_table_offset) // 8}")
        elif offset in l2:
            out.append("L2 table")
        elif offset in metadata.refcount_table.entries:
            out.append("refcount block")
        else:
            out.append("data")
    return out


async def map_new_cluster(metadata: Metadata, guest_cluster: int) -> int:
    """What an allocating write does: a data cluster, written, and for a guest cluster whose
    L1 entry is empty a new L2 table; returns the data cluster."""
    g = metadata.geometry
    offset = guest_cluster * g.cluster_size
    l1_index = g.l1_index(offset)
    table_offset = metadata.l1_table.entries[l1_index] & OFFSET_MASK
    if table_offset:
        table = await metadata.l2_tables.load(table_offset)
    else:
        table_offset = await metadata.allocator.allocate(1)
        table = array("Q", bytes(g.cluster_size))
        metadata.l2_tables.tables.put(table_offset, table, dirty=True)
        await metadata.l2_tables.evict()
        metadata.l1_table.entries[l1_index] = table_offset | OFLAG_COPIED
        metadata.l1_table.dirty.add(l1_index)
    host = await metadata.allocator.allocate(1)
    await metadata.file.write(host, bytes(g.cluster_size))
    table[g.l2_index(offset)] = host | OFLAG_COPIED
    metadata.l2_tables.tables.mark_dirty(table_offset)
    return host


async def unmap(metadata: Metadata, guest_cluster: int) -> None:
    """What a zero write of a whole cluster does: its L2 entry cleared, its reference
    dropped."""
    g = metadata.geometry
    offset = guest_cluster * g.cluster_size
    table_offset = metadata.l1_table.entries[g.l1_index(offset)] & OFFSET_MASK
    table = await metadata.l2_tables.load(table_offset)
    host, table[g.l2_index(offset)] = table[g.l2_index(offset)] & OFFSET_MASK, 0
    metadata.l2_tables.tables.mark_dirty(table_offset)
    metadata.allocator.drop([host])


async def test_write_back_goes_refcounts_l2_l1_decreases_with_a_barrier_between_each() -> None:
    file, metadata = await new_metadata()
    host = await map_new_cluster(metadata, 0)
    await unmap(metadata, 0)
    file.ops.clear()
    assert await metadata.write_back()
    assert names(file, metadata) == [
        "refcount block",
        "barrier",
        "L2 table",
        "barrier",
        "L1 entry 0",
        "barrier",
        "refcount block",
        "barrier",
    ]
    assert not metadata.pending()
    assert metadata.allocator.freed == [host]
    file.ops.clear()
    assert not await metadata.write_back()  # nothing left: no barrier either
    assert file.ops == []


async def test_an_l2_update_alone_still_waits_for_a_barrier_after_the_data() -> None:
    """Guest data written to a new cluster is invisible to the cache: the L2 table that
    points to it is written after a barrier even when no refcount block is dirty."""
    file, metadata = await new_metadata()
    await map_new_cluster(metadata, 0)
    await metadata.write_back()
    table_offset = metadata.l1_table.entries[0] & OFFSET_MASK
    metadata.l2_tables.tables.mark_dirty(table_offset)  # a zero write, say
    file.ops.clear()
    await metadata.write_back()
    assert names(file, metadata) == ["barrier", "L2 table", "barrier"]


async def test_a_new_refcount_block_is_durable_before_the_table_names_it() -> None:
    file, metadata = await new_metadata("512", refcount_blocks=64)
    for guest in range(300):  # a 512-byte cluster's refcount block counts 256 clusters
        await map_new_cluster(metadata, guest)
    file.ops.clear()
    await metadata.write_back()
    ops = names(file, metadata)
    first_barrier = ops.index("barrier")
    assert set(ops[:first_barrier]) == {"refcount block"}
    assert ops[first_barrier + 1 : first_barrier + 3] == ["refcount table", "barrier"]
    assert ops.index("L2 table") > first_barrier + 2
    assert (await check(file)).corruptions == 0


async def test_an_evicted_l2_table_is_written_after_the_refcounts_and_a_barrier() -> None:
    file, metadata = await new_metadata(l2_tables=2)
    await map_new_cluster(metadata, 0)
    span = metadata.geometry.l2_entries
    await map_new_cluster(metadata, span)
    file.ops.clear()
    await map_new_cluster(metadata, 2 * span)  # a third table: the first is evicted
    assert names(file, metadata) == ["refcount block", "barrier", "L2 table", "data"]
    assert len(metadata.l2_tables.tables) == 2
    await metadata.write_back()
    assert (await check(file)).corruptions == 0


async def test_a_moved_l1_table_is_durable_before_the_header_may_name_it() -> None:
    file, metadata = await new_metadata("512")
    l1 = metadata.l1_table
    await map_new_cluster(metadata, 0)
    l1.entries.extend([0] * 100)
    host = await metadata.allocator.allocate(-(-len(l1.entries) * 8 // 512))
    file.ops.clear()
    await l1.move(host)
    assert file.ops == [("write", host), ("barrier", 0)]
    assert (metadata.header.l1_table_offset, metadata.header.l1_size) == (host, len(l1.entries))
    assert not l1.pending()
    assert decode_table(file.data[host : host + 8 * len(l1.entries)]) == l1.entries


async def filled(fail_flush: int | None = None) -> tuple[RecordingFile, Metadata]:
    """Metadata with new L2 tables, new refcount blocks (512-byte clusters) and dropped
    references, all waiting for write-back; the ``fail_flush``-th barrier of that
    write-back will fail."""
    file, metadata = await new_metadata("512", l2_tables=512, refcount_blocks=64)
    for guest in range(0, 20000, 29):
        await map_new_cluster(metadata, guest)
    for guest in range(0, 20000, 3 * 29):
        await unmap(metadata, guest)
    if fail_flush is not None:
        file.fail_flush = {file.flushes + fail_flush}
    return file, metadata


async def test_after_a_failed_barrier_nothing_is_clean_and_a_retry_writes_it_all() -> None:
    """A table is clean only after a barrier that follows its write succeeded: whichever
    barrier of the write-back fails, a second write-back leaves the image as one without the
    failure does."""
    file, metadata = await filled()
    before = file.flushes
    await metadata.write_back()
    barriers, expected = file.flushes - before, bytes(file.data)
    assert barriers == 5  # blocks | table | L2 tables | L1 entries | decreases |
    assert (await check(file)).clean
    for failing in range(barriers):
        file, metadata = await filled(failing)
        with pytest.raises(BlockError):
            await metadata.write_back()
        assert metadata.pending()
        assert await metadata.write_back()
        assert bytes(file.data) == expected, f"barrier {failing} failed"
        assert not metadata.pending()


class Kind(WriteBack):
    """A kind of metadata with one entry, which records its writes in ``log``."""

    def __init__(
        self,
        name: str,
        log: list[str],
        barrier: Barrier,
        depends_on: WriteBack | None = None,
        depends_on_flush: bool = False,
    ) -> None:
        super().__init__(barrier, depends_on, depends_on_flush)
        self.name, self.log, self.dirty = name, log, False

    def pending(self) -> bool:
        return self.dirty

    async def write_dirty(self) -> None:
        if self.dirty:
            self.log.append(self.name)
            self._written.append(0)

    def clean(self, keys: list[int]) -> None:
        if keys:
            self.dirty = False


class LogFlushes:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    size = 0

    async def read(self, offset: int, length: int) -> bytes:
        raise AssertionError("no reads")

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        raise AssertionError("no writes")

    async def flush(self) -> None:
        self.log.append("|")

    async def discard(self, offset: int, length: int) -> None:
        raise AssertionError("no discards")


@FAST
@given(st.lists(st.booleans(), min_size=3, max_size=3), st.booleans())
def test_a_kind_waits_for_a_barrier_after_its_dependencies_only_when_it_writes(
    dirty: list[bool], flush_first: bool
) -> None:
    """A <- B <- C: each writes after what it depends on, with a barrier between when it has
    something to write (or always, with depends_on_flush); clean once a barrier followed."""
    log: list[str] = []
    barrier = Barrier(LogFlushes(log))
    a = Kind("A", log, barrier)
    b = Kind("B", log, barrier, a, depends_on_flush=flush_first)
    c = Kind("C", log, barrier, b)
    for kind, flag in zip((a, b, c), dirty, strict=True):
        kind.dirty = flag
    trio.run(c.write_back)
    expected = "A" if dirty[0] else ""
    if flush_first or dirty[1]:
        expected += "|"
    expected += "B" if dirty[1] else ""
    if dirty[2]:
        expected += "|C"
    assert "".join(log) == expected
    trio.run(barrier)
    assert not (a.dirty or b.dirty or c.dirty)
