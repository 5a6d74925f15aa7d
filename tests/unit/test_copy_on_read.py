"""The copy-on-read filter over a qcow2 overlay: reads copy what comes from the backing file
into the top image, and only that; the top then holds the data on its own; a write racing a
copy-up is never overwritten by the stale bytes; a read-only node is refused. Delays that
widen the races run on trio's fake clock."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from blkfs.block import Status
from blkfs.block.registry import default_registry
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
CLUSTER = 64 * KiB
DATA = [(0, MiB), (2 * MiB + 4 * KiB, 100 * KiB), (3 * MiB + 5, 70 * KiB)]
"""Where the backing file holds data; everything else is a hole (or unallocated)."""


def base_contents() -> bytes:
    data = bytearray(SIZE)
    for offset, length in DATA:
        data[offset : offset + length] = os.urandom(length)
    return bytes(data)


def create_qcow2(
    path: Path,
    size: int,
    backing: str | None = None,
    backing_format: str | None = None,
    **options: str,
) -> None:
    with open(path, "xb") as f:
        default_registry().get("qcow2").create(f, size, options, backing, backing_format)


async def make_chain(images: Path, backing_format: str) -> bytes:
    """top.qcow2 over base.<fmt>, which holds ``DATA`` and nothing else."""
    contents = base_contents()
    base = images / f"base.{backing_format}"
    if backing_format == "raw":
        with open(base, "wb") as f:  # holes where there is no data
            f.truncate(SIZE)
            for offset, length in DATA:
                f.seek(offset)
                f.write(contents[offset : offset + length])
    else:
        create_qcow2(base, SIZE)
        layer = BlockLayer()
        try:
            backend = await layer.create("base", str(base))
            for offset, length in DATA:
                await backend.write(offset, contents[offset : offset + length])
        finally:
            await layer.close()
    create_qcow2(images / "top.qcow2", SIZE, base.name, backing_format)
    return contents


def cor(images: Path, extra: str = "") -> str:
    return (
        f"driver=copy-on-read,node-name=cor{extra},file.driver=qcow2,file.node-name=top,"
        f"file.file.driver=file,file.file.filename={images / 'top.qcow2'}"
    )


async def allocated_ranges(node: Any, size: int) -> list[tuple[int, int]]:
    """The ranges the node itself decides (block_status ALLOCATED), merged."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        extent = await node.block_status(offset, size - offset)
        if Status.ALLOCATED in extent.status:
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], offset + extent.length)
            else:
                ranges.append((offset, offset + extent.length))
        offset += extent.length
    return ranges


def clusters_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {c for start, end in ranges for c in range(start // CLUSTER, (end - 1) // CLUSTER + 1)}


@pytest.mark.parametrize("backing_format", ["raw", "qcow2"])
async def test_reads_fill_the_top_with_the_backing_data_and_only_that(
    images: Path, backing_format: str
) -> None:
    contents = await make_chain(images, backing_format)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", cor(images))
        top = layer.graph.find("top")
        assert await allocated_ranges(top, SIZE) == []
        chunk = 100_000  # reads that start and end inside clusters
        for offset in range(0, SIZE, chunk):
            length = min(chunk, SIZE - offset)
            assert await backend.read(offset, length) == contents[offset : offset + length]
        info = (await backend.status())["tree"]["info"]
        data_clusters = clusters_of([(o, o + n) for o, n in DATA])
        # a copy-up into part of a cluster brings the rest along (qcow2's copy-on-write)
        assert 0 < info["copied-bytes"] <= len(data_clusters) * CLUSTER
        # the top now decides every byte of data, and no hole of the chain was copied
        allocated = await allocated_ranges(top, SIZE)
        for offset, length in DATA:
            assert any(s <= offset and offset + length <= e for s, e in allocated), offset
        assert clusters_of(allocated) == data_clusters
        # later reads are local: nothing more is copied
        assert await backend.read(0, SIZE) == contents
        assert (await backend.status())["tree"]["info"] == info
    finally:
        await layer.close()
    assert await read_top_alone(images, SIZE) == contents  # the top holds it all itself


async def test_data_the_top_already_holds_is_not_copied(images: Path) -> None:
    contents = await make_chain(images, "raw")
    layer = BlockLayer()
    try:
        backend = await layer.create("d", cor(images))
        await backend.write(0, b"new" * 1000)
        expected = b"new" * 1000 + contents[3000:CLUSTER]
        assert await backend.read(0, CLUSTER) == expected
        assert (await backend.status())["tree"]["info"]["copied-bytes"] == 0
        await backend.write_zeroes(CLUSTER, CLUSTER)
        assert await backend.read(CLUSTER, CLUSTER) == bytes(CLUSTER)
        assert (await backend.status())["tree"]["info"]["copied-bytes"] == 0
    finally:
        await layer.close()


async def test_a_partial_read_copies_what_it_read(images: Path) -> None:
    contents = await make_chain(images, "qcow2")
    layer = BlockLayer()
    try:
        backend = await layer.create("d", cor(images))
        assert await backend.read(5 * CLUSTER + 100, 10) == contents[5 * CLUSTER + 100 :][:10]
        assert (await backend.status())["tree"]["info"]["copied-bytes"] >= 10
        top = layer.graph.find("top")
        assert clusters_of(await allocated_ranges(top, SIZE)) == {5}
        assert await backend.read(0, SIZE) == contents
    finally:
        await layer.close()


def dotted(prefix: str, options: str) -> str:
    return ",".join(f"{prefix}.{pair}" for pair in options.split(","))


def delayed_chain(images: Path, where: str, delay: str) -> str:
    """copy-on-read over top.qcow2 over the raw base, with a blkdebug delay on the backing
    file's reads (``backing``), on the top's host file writes (``top``), or on every write
    the filter sends to the top image (``between``)."""
    base = f"driver=blkdebug,image.driver=file,image.filename={images / 'base.raw'}"
    top_file = f"driver=file,filename={images / 'top.qcow2'}"
    if where == "backing":
        base += f",delay.read={delay}"
    elif where == "top":
        top_file = (
            f"driver=blkdebug,delay.write={delay},image.driver=file,"
            f"image.filename={images / 'top.qcow2'}"
        )
    top = f"driver=qcow2,node-name=top,{dotted('file', top_file)},{dotted('backing', base)}"
    if where == "between":
        return (
            f"driver=copy-on-read,node-name=cor,file.driver=blkdebug,"
            f"file.delay.write={delay},{dotted('file.image', top)}"
        )
    return f"driver=copy-on-read,node-name=cor,{dotted('file', top)}"


async def test_a_write_during_a_copy_up_is_not_overwritten_by_stale_data(
    images: Path, autojump_clock
) -> None:
    contents = await make_chain(images, "raw")
    new = b"N" * 4096
    layer = BlockLayer()
    try:
        backend = await layer.create("d", delayed_chain(images, "backing", "1s"))
        got: dict[str, bytes] = {}

        async def reader() -> None:
            got["read"] = bytes(await backend.read(0, 2 * CLUSTER))

        async def writer() -> None:
            await trio.sleep(0.5)  # while the reader waits for the backing file
            await backend.write(4096, new)
            await backend.write(CLUSTER + 8192, new)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
        expected = bytearray(contents[: 2 * CLUSTER])
        assert got["read"] == expected  # the read came first: it saw the backing data
        expected[4096:8192] = new
        expected[CLUSTER + 8192 : CLUSTER + 12288] = new
        assert await backend.read(0, 2 * CLUSTER) == expected
    finally:
        await layer.close()


async def test_a_discard_during_a_copy_up_is_not_undone_by_it(images: Path, autojump_clock) -> None:
    """The copy-up reaches the top image late (writes are delayed, discards are not); a
    discard that arrives meanwhile must win, not be overwritten by the old bytes."""
    contents = await make_chain(images, "raw")
    layer = BlockLayer()
    try:
        backend = await layer.create("d", delayed_chain(images, "between", "1s"))

        async def discarder() -> None:
            await trio.sleep(0.5)
            await backend.discard(0, CLUSTER)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.read, 0, 2 * CLUSTER)
            nursery.start_soon(discarder)
        assert (
            await backend.read(0, 2 * CLUSTER) == bytes(CLUSTER) + contents[CLUSTER : 2 * CLUSTER]
        )
    finally:
        await layer.close()


async def test_a_write_to_the_rest_of_a_cluster_being_copied_survives(
    images: Path, autojump_clock
) -> None:
    """The copy-up of one part of a cluster and a write to another part of it overlap in
    the top image's cluster; neither may lose the other's bytes."""
    contents = await make_chain(images, "raw")
    new = b"W" * 4096
    layer = BlockLayer()
    try:
        backend = await layer.create("d", delayed_chain(images, "top", "1s"))

        async def writer() -> None:
            await trio.sleep(0.5)  # while the copy-up of [0, 4k) is being written
            await backend.write(32 * KiB, new)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.read, 0, 4096)
            nursery.start_soon(writer)
        expected = bytearray(contents[:CLUSTER])
        expected[32 * KiB : 36 * KiB] = new
        assert await backend.read(0, CLUSTER) == expected
    finally:
        await layer.close()
    assert await read_top_alone(images, CLUSTER) == expected


async def test_a_read_during_a_write_waits_for_it_and_copies_nothing(
    images: Path, autojump_clock
) -> None:
    """The write reaches the top image late; a read of the same range that starts
    meanwhile sees the range unallocated, but must not copy the backing data up after it."""
    contents = await make_chain(images, "raw")
    new = b"X" * CLUSTER
    layer = BlockLayer()
    try:
        backend = await layer.create("d", delayed_chain(images, "between", "1s"))
        got: dict[str, bytes] = {}

        async def reader() -> None:
            await trio.sleep(0.5)  # while the write is on its way to the top image
            got["read"] = bytes(await backend.read(0, 2 * CLUSTER))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.write, 0, new)
            nursery.start_soon(reader)
        assert got["read"] == new + contents[CLUSTER : 2 * CLUSTER]
        assert await backend.read(0, 2 * CLUSTER) == new + contents[CLUSTER : 2 * CLUSTER]
        info = (await backend.status())["tree"]["info"]
        assert info["copied-bytes"] == CLUSTER  # the second cluster only
    finally:
        await layer.close()
    assert await read_top_alone(images, 2 * CLUSTER) == new + contents[CLUSTER : 2 * CLUSTER]


async def test_copy_up_through_a_filter_above_the_overlay(images: Path) -> None:
    """copy-on-read over throttle over qcow2: the backing chain is found below the filter."""
    contents = await make_chain(images, "qcow2")
    layer = BlockLayer()
    try:
        top = f"driver=qcow2,file.driver=file,file.filename={images / 'top.qcow2'}"
        backend = await layer.create(
            "d",
            f"driver=copy-on-read,file.driver=throttle,file.limits.iops-total=100000,"
            f"{dotted('file.file', top)}",
        )
        assert await backend.read(0, SIZE) == contents
        assert (await backend.status())["tree"]["info"]["copied-bytes"] > 0
    finally:
        await layer.close()
    assert await read_top_alone(images, SIZE) == contents


async def read_top_alone(images: Path, length: int) -> bytes:
    """What top.qcow2 holds by itself, its backing file cut off."""
    layer = BlockLayer()
    try:
        alone = await layer.create(
            "alone",
            f"driver=qcow2,backing=null,read-only=on,file.driver=file,"
            f"file.filename={images / 'top.qcow2'}",
        )
        return bytes(await alone.read(0, length))
    finally:
        await layer.close()


@pytest.mark.parametrize("how", ["option", "backend"])
async def test_a_read_only_copy_on_read_node_is_refused(images: Path, how: str) -> None:
    await make_chain(images, "raw")
    layer = BlockLayer()
    try:
        with pytest.raises(BlockError) as failed:
            if how == "option":
                await layer.create("d", cor(images) + ",read-only=on")
            else:
                await layer.create("d", cor(images), read_only=True)
        assert failed.value.errno == errno.EINVAL
        assert "copy-on-read" in failed.value.message and "writable" in failed.value.message
        assert "d" not in layer and not layer.graph.nodes
        await layer.create("d", cor(images))  # nothing was left locked or half-open
    finally:
        await layer.close()


async def test_a_live_copy_on_read_node_cannot_be_made_read_only(images: Path) -> None:
    contents = await make_chain(images, "raw")
    layer = BlockLayer()
    try:
        backend = await layer.create("d", cor(images))
        with pytest.raises(BlockError) as failed, trio.fail_after(5):
            await layer.reopen("cor", "read-only=on")
        # EINVAL from the filter; ENOTSUP while the layer refuses read-only reopens itself
        assert failed.value.errno in (errno.EINVAL, errno.ENOTSUP)
        assert not backend.read_only
        assert await backend.read(0, CLUSTER) == contents[:CLUSTER]
        assert (await backend.status())["tree"]["info"]["copied-bytes"] > 0
    finally:
        await layer.close()
