"""The refcount allocator (:mod:`blkfs_drivers.qcow2.refcount`) over an image in memory: what it
allocates is counted once, what is dropped is freed only after write-back, the refcount
structures grow as QEMU grows them, and the checker agrees after every run."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from blkfs_drivers.qcow2.check import check
from blkfs_drivers.qcow2.create import build_header, empty_image
from blkfs_drivers.qcow2.metadata import Metadata
from blkfs_drivers.qcow2.ondisk import Header, get_refcount
from blkfs_drivers.qcow2.refcount import FreeClusters
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError
from blkfs.image import create_image
from blkfs.layer import BlockLayer
from tests.unit.test_qcow2_cache import RecordingFile


async def new_image(
    cluster_size: str = "512", refcount_bits: int = 16, refcount_blocks: int = 2
) -> tuple[RecordingFile, Metadata]:
    """A new 64 MiB image, a refcount cache of ``refcount_blocks`` blocks."""
    header = build_header(
        64 << 20, {"cluster_size": cluster_size, "refcount_bits": str(refcount_bits)}, None, None
    )
    file = RecordingFile(empty_image(header))
    return file, await Metadata.load(
        file, True, 8 * header.cluster_size, refcount_blocks * header.cluster_size
    )


def stored_refcount(file: RecordingFile, cluster: int) -> int:
    """The refcount of ``cluster`` as the image file holds it."""
    header = Header.unpack(bytes(file.data[:512]))
    size = header.cluster_size
    per_block = size * 8 >> header.refcount_order
    index, within = divmod(cluster, per_block)
    table = header.refcount_table_offset
    block = int.from_bytes(file.data[table + 8 * index : table + 8 * index + 8], "big")
    if not block:
        return 0
    return get_refcount(file.data[block : block + size], within, header.refcount_order)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=12),
    st.integers(2, 6),
)
def test_allocated_clusters_are_counted_once_and_dropped_ones_freed_after_write_back(
    steps: list[tuple[int, bool]], cache_blocks: int
) -> None:
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


# -- reuse of freed clusters ----------------------------------------------------------------

free_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 60)),
        st.tuples(st.just("take"), st.integers(1, 6), st.booleans()),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(free_ops)
def test_free_clusters_behave_as_a_sorted_set_taken_lowest_first(
    ops: list[tuple[Any, ...]],
) -> None:
    """Against a set of cluster numbers: ``take`` gives the lowest run (the first one long
    enough with ``exact``), and the runs stay sorted and merged."""
    free = FreeClusters(512)
    model: set[int] = set()
    for op in ops:
        if op[0] == "add":
            cluster = op[1]
            if cluster in model:
                with pytest.raises(ValueError):
                    free.add(cluster * 512)
                continue
            free.add(cluster * 512)
            model.add(cluster)
        else:
            _, count, exact = op
            runs = []  # the model's runs, lowest first
            for cluster in sorted(model):
                if runs and runs[-1][1] == cluster:
                    runs[-1][1] += 1
                else:
                    runs.append([cluster, cluster + 1])
            fits = [run for run in runs if not exact or run[1] - run[0] >= count]
            taken = free.take(count, exact)
            if not fits:
                assert taken is None
                continue
            start = fits[0][0]
            assert taken == (start * 512, min(count, fits[0][1] - start))
            model -= set(range(start, start + taken[1]))
        assert all(end < start for end, start in zip(free.ends[:-1], free.starts[1:], strict=True))
        assert {
            c
            for s, e in zip(free.starts, free.ends, strict=True)
            for c in range(s // 512, e // 512)
        } == model


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.sampled_from(["keep", "drop", "flush"])),
        min_size=1,
        max_size=30,
    ),
    st.integers(2, 6),
)
def test_dropped_clusters_are_reused_only_once_their_freeing_is_durable(
    steps: list[tuple[int, str]], cache_blocks: int
) -> None:
    """As the driver does it: a write-back makes drops durable, then the freed clusters go
    back to the allocator. A reused cluster is never one a live reference holds, nor one
    whose zero refcount is not yet on disk; the image grows only when no freed cluster is
    at hand, and the checker finds no corruption."""

    async def run() -> None:
        file, metadata = await new_image(refcount_blocks=cache_blocks)
        allocator = metadata.allocator
        live: set[int] = set()
        for count, action in steps:
            pooled = bool(allocator.free.starts)
            end = allocator.next_free
            host, got = await allocator.allocate_run(count)
            clusters = {host + i * 512 for i in range(got)}
            assert 1 <= got <= count and not clusters & live
            if pooled:
                assert allocator.next_free == end  # nothing appended while one was free
            for cluster in clusters - set(range(end, allocator.next_free, 512)):
                assert stored_refcount(file, cluster // 512) == 0  # durable before reuse
            await file.write(host + got * 512 - 1, b"\0")
            if action == "drop":
                allocator.drop(sorted(clusters))
            else:
                live |= clusters
            if action == "flush" or len(allocator.dropped) > 8:
                await metadata.write_back()
                freed, allocator.freed = allocator.freed, []
                allocator.reuse(freed)
        await metadata.write_back()
        assert all(stored_refcount(file, c // 512) == 1 for c in live)
        report = await check(file)
        assert (report.corruptions, report.check_errors) == (0, 0), report.messages
        assert report.leaks == len(live)

    trio.run(run)


async def test_a_cluster_a_read_in_flight_mapped_is_not_reused_under_it(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A read mapped a cluster and waits on a lagging disk (its delay ends when the test
    moves the clock); meanwhile the cluster is
    discarded, flushed (its freeing durable) and new data is written elsewhere. The new
    data must not take the cluster while the read is in flight: the read gets what was
    there, never another offset's data."""
    image = tmp_path / "img.qcow2"
    await create_image(str(image), "qcow2", 4 << 20)
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=qcow2,file.driver=blkdebug,file.node-name=lag,"
            f"file.image.driver=file,file.image.filename={image}",
        )
        await backend.write(0, b"\1" * 65536)
        await backend.flush()
        await layer.reopen("lag", {"delay.read": "1s"})
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await backend.read(0, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            await backend.discard(0, 65536)
            await backend.flush()
            await backend.write(1 << 20, b"\2" * 65536)
            await backend.flush()
            mock_clock.jump(1)
        assert got == [b"\1" * 4096]
        await layer.reopen("lag", {"delay.read": "0"})
        assert await backend.read(1 << 20, 65536) == b"\2" * 65536
        await backend.flush()  # with no request in flight, it goes back to the allocator
        await backend.write(2 << 20, b"\3" * 65536)  # and is reused
        await backend.flush()
    finally:
        await layer.close()
    # the header, refcount table and block, L1 and L2 tables, and two data clusters
    assert image.stat().st_size == 7 * 65536
