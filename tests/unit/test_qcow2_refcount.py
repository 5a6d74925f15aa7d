"""The refcount allocator (:mod:`drivers.qcow2.refcount`) over an image in memory: what it
allocates is counted once, what is dropped is freed only after write-back, the refcount
structures grow as QEMU grows them, and the checker agrees after every run."""

from __future__ import annotations

import errno

import pytest
import trio
from blkfs_drivers.qcow2.check import check
from blkfs_drivers.qcow2.create import build_header, empty_image
from blkfs_drivers.qcow2.metadata import Metadata
from blkfs_drivers.qcow2.ondisk import Header, get_refcount
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError
from tests.unit.test_qcow2_cache import RecordingFile


async def new_image(cluster_size: str = "512", refcount_bits: int = 16,
                    refcount_blocks: int = 2) -> tuple[RecordingFile, Metadata]:
    """A new 64 MiB image, a refcount cache of ``refcount_blocks`` blocks."""
    header = build_header(64 << 20, {"cluster_size": cluster_size,
                                     "refcount_bits": str(refcount_bits)}, None, None)
    file = RecordingFile(empty_image(header))
    return file, await Metadata.load(file, True, 8 * header.cluster_size,
                                     refcount_blocks * header.cluster_size)


def stored_refcount(file: RecordingFile, cluster: int) -> int:
    """The refcount of ``cluster`` as the image file holds it."""
    header = Header.unpack(bytes(file.data[:512]))
    size = header.cluster_size
    per_block = size * 8 >> header.refcount_order
    index, within = divmod(cluster, per_block)
    table = header.refcount_table_offset
    block = int.from_bytes(file.data[table + 8 * index:table + 8 * index + 8], "big")
    if not block:
        return 0
    return get_refcount(file.data[block:block + size], within, header.refcount_order)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=12),
       st.integers(2, 6))
def test_allocated_clusters_are_counted_once_and_dropped_ones_freed_after_write_back(
        steps: list[tuple[int, bool]], cache_blocks: int) -> None:
    """Clusters that nothing references are leaks to the checker: every allocated cluster
    not dropped is exactly one leak, every dropped one has refcount 0, and there is never a
    corruption, however small the refcount cache (blocks evicted, new ones made)."""
    async def run() -> None:
        file, metadata = await new_image(refcount_blocks=cache_blocks)
        allocator = metadata.allocator
        start = allocator.next_free
        live: list[int] = []
        dropped: list[int] = []
        for count, drop in steps:
            host = await allocator.allocate(count)
            await file.write(host + count * 512 - 1, b"\0")  # the data written
            clusters = [host + i * 512 for i in range(count)]
            assert clusters[0] >= start and all(c not in live + dropped for c in clusters)
            if drop:
                allocator.drop(clusters)
                dropped += clusters
                assert all(stored_refcount(file, c // 512) <= 1 for c in clusters)
            else:
                live += clusters
            if len(live) % 3 == 0:
                await metadata.write_back()
        await metadata.write_back()
        assert sorted(allocator.freed) == sorted(dropped)
        assert all(stored_refcount(file, c // 512) == 1 for c in live)
        assert all(stored_refcount(file, c // 512) == 0 for c in dropped)
        report = await check(file)
        assert (report.corruptions, report.check_errors) == (0, 0), report.messages
        assert report.leaks == len(live)

    trio.run(run)


async def test_the_refcount_table_moves_and_the_header_names_it_only_once_durable() -> None:
    file, metadata = await new_image()
    header = metadata.header
    old_table = header.refcount_table_offset
    # a table cluster of a 512-byte image names 64 blocks of 256 clusters
    while header.refcount_table_offset == old_table:
        await metadata.allocator.allocate(256)
    await file.write(metadata.allocator.next_free - 1, b"\0")
    new_table = header.refcount_table_offset
    ops = file.ops
    table_write = ops.index(("write", new_table))
    header_write = ops.index(("write", 0))
    assert ("barrier", 0) in ops[table_write:header_write]
    assert ops[header_write + 1] == ("barrier", 0)
    assert stored_refcount(file, old_table // 512) == 1  # freed only after write-back
    await metadata.write_back()
    assert stored_refcount(file, old_table // 512) == 0
    assert stored_refcount(file, new_table // 512) == 1
    report = await check(file)
    assert report.corruptions == 0 and report.check_errors == 0, report.messages


async def test_a_refcount_that_would_overflow_is_enospc_and_changes_nothing() -> None:
    file, metadata = await new_image(refcount_bits=1)
    host = await metadata.allocator.allocate(1)
    with pytest.raises(BlockError) as err:
        await metadata.allocator.update_refcount(host, 1)
    assert err.value.errno == errno.ENOSPC
    await metadata.write_back()
    assert stored_refcount(file, host // 512) == 1


async def test_a_refcount_below_zero_is_a_corrupt_image() -> None:
    _, metadata = await new_image()
    host = await metadata.allocator.allocate(1)
    await metadata.allocator.update_refcount(host, -1)
    with pytest.raises(BlockError) as err:
        await metadata.allocator.update_refcount(host, -1)
    assert err.value.errno == errno.EIO and "corrupt" in err.value.message
