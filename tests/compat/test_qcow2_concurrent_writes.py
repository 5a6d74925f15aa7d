"""Allocating qcow2 writes in flight together (drivers/qcow2/allocations.py): writes to
other clusters write their data at the same time, writes to the same cluster wait for each
other, and what QEMU reads afterwards is what was written, in images ``qemu-img check``
passes."""

from __future__ import annotations

import errno
import itertools
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blkfs.backend import BlockBackend
from blkfs.block import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, check, qemu, to_raw
from tests.compat.test_qcow2_write import VARIANTS
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount

pytestmark = [needs_qemu]

KiB = 1 << 10


def qemu_reads(image: Path, model: bytes | bytearray, ranges: list[tuple[int, int]]) -> None:
    """qemu-io reads each run of equal bytes of ``model`` in ``ranges`` with ``read -P``."""
    commands: list[str] = []
    for offset, length in ranges:
        start, end = offset, offset + length
        while start < end:
            stop = start + 1
            while stop < end and model[stop] == model[start]:
                stop += 1
            commands += ["-c", f"read -P {model[start]} {start} {stop - start}"]
            start = stop
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", *commands, str(image)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "fail" not in result.stdout.lower(), result.stdout


async def open_slow(layer: BlockLayer, image: Path, delay: str) -> BlockBackend:
    """The image over a blkdebug node ``slow`` that holds each write for ``delay``."""
    return await layer.create(
        "d",
        f"driver=qcow2,file.driver=blkdebug,file.node-name=slow,file.delay.write={delay},"
        f"file.image.driver=file,file.image.filename={image}",
    )


async def test_allocating_writes_to_other_clusters_write_their_data_together(
    images: Path,
) -> None:
    """Each data write is held 100 ms: the four allocating writes' data writes are held at
    the same time (one at a time while the image's lock was held across them)."""
    image = VARIANTS["v3-64k"](images)
    model = bytearray(to_raw(image))
    layer = BlockLayer()
    peak = 0
    try:
        backend = await open_slow(layer, image, "100ms")
        slow = layer.graph.nodes["slow"].driver
        writes = [(i * MiB + 4 * KiB, bytes([i + 1]) * (200 * KiB)) for i in range(4)]
        async with trio.open_nursery() as nursery:
            for offset, data in writes:
                nursery.start_soon(backend.write, offset, data)
            while nursery.child_tasks:
                peak = max(peak, slow.info()["delayed"])
                await trio.sleep(0.005)
        for offset, data in writes:
            model[offset : offset + len(data)] = data
    finally:
        await layer.close()
    assert peak >= 2
    check(image)
    assert to_raw(image) == model
    qemu_reads(image, model, [(offset, len(data)) for offset, data in writes])


async def test_a_flush_while_an_allocation_is_in_flight_leaves_an_image_that_leaks_at_worst(
    images: Path,
) -> None:
    """A flush that writes back while a write's new cluster is taken but not linked (every
    host write held 200 ms) writes the cluster's refcount and no entry naming it: the image
    as that flush left it (a power cut then) checks clean but for a leak and reads the old
    data, and the write, once done, is what QEMU reads."""
    image = VARIANTS["v3-64k"](images)
    crashed = images / "crashed.qcow2"
    layer = BlockLayer()
    try:
        backend = await open_slow(layer, image, "200ms")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.write, 3 * MiB, b"\7" * (64 * KiB))
            await trio.sleep(0.05)  # the allocation is in flight, its data write held
            await backend.flush()
            shutil.copyfile(image, crashed)
    finally:
        await layer.close()
    leak = check(crashed)
    assert "leaked" in leak, leak
    assert to_raw(crashed)[3 * MiB : 3 * MiB + 64 * KiB] == bytes(64 * KiB)
    check(image)
    qemu_reads(image, bytes(3 * MiB) + b"\7" * (64 * KiB), [(3 * MiB, 64 * KiB)])


async def test_a_failed_allocation_frees_its_cluster_and_the_write_waiting_for_it_goes_on(
    images: Path,
) -> None:
    """The first host write fails (the data of the first write, in flight, held 50 ms),
    while a second write into the same cluster waits for that allocation: the first fails
    with EIO, the second then allocates and writes, and the failed one's cluster is freed
    (no leak)."""
    image = VARIANTS["v3-64k"](images)
    layer = BlockLayer()
    failed: list[int] = []

    async def write_failing(offset: int, data: bytes) -> None:
        try:
            await backend.write(offset, data)
        except BlockError as exc:
            failed.append(exc.errno)

    try:
        backend = await layer.create(
            "d",
            "driver=qcow2,file.driver=blkdebug,file.delay.write=50ms,"
            "file.inject-error.0.event=write,file.inject-error.0.once=on,"
            f"file.image.driver=file,file.image.filename={image}",
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_failing, 2 * MiB, b"\1" * (4 * KiB))
            await trio.sleep(0.01)
            nursery.start_soon(backend.write, 2 * MiB + 32 * KiB, b"\2" * (4 * KiB))
        await backend.flush()
    finally:
        await layer.close()
    assert failed == [errno.EIO]
    assert "leaked" not in check(image)
    model = bytearray(to_raw(image))
    assert model[2 * MiB : 2 * MiB + 64 * KiB] == bytes(32 * KiB) + b"\2" * (4 * KiB) + bytes(
        28 * KiB
    )
    qemu_reads(image, model, [(2 * MiB, 64 * KiB)])


def shared_cluster_writes(rng: random.Random, size: int, cluster: int) -> list[tuple[int, int]]:
    """(offset, length) of writes that never overlap each other but share clusters: pieces
    of a few clusters, cut at random points, and runs across cluster boundaries."""
    cuts: set[int] = set()
    for _ in range(6):
        base = rng.randrange(0, size // cluster - 4) * cluster
        cuts.update(base + rng.randrange(0, 4 * cluster) for _ in range(5))
    for _ in range(6):
        cuts.add(rng.randrange(0, size))
    points = sorted(cuts | {0, size})
    spans = [(a, b - a) for a, b in itertools.pairwise(points) if b > a]
    rng.shuffle(spans)
    return spans[: len(spans) // 2 + 1]


@pytest.mark.parametrize(
    "variant", ["v3-64k", "c512", "extl2", "v2", "overlay", "overlay-extl2", "compressed"]
)
async def test_concurrent_writes_sharing_clusters_read_back_in_qemu(
    images: Path, variant: str
) -> None:
    """Rounds of writes that touch the same clusters (never the same bytes) all in flight
    at once, with zero writes and discards among them, over an image with a backing file,
    compressed clusters, subclusters; each write held a moment so they interleave."""
    image = VARIANTS[variant](images)
    model = bytearray(to_raw(image))
    cluster = 512 if variant == "c512" else 64 * KiB
    rng = random.Random(variant)
    layer = BlockLayer()
    try:
        backend = await open_slow(layer, image, "2ms")
        for _ in range(4):
            written: list[tuple[int, int]] = []
            discarded: list[tuple[int, int]] = []
            async with trio.open_nursery() as nursery:
                for offset, length in shared_cluster_writes(rng, len(model), cluster):
                    kind = rng.choice(("data", "data", "data", "zeroes", "discard"))
                    if kind == "data":
                        data = bytes([rng.randrange(1, 256)]) * length
                        nursery.start_soon(backend.write, offset, data)
                        model[offset : offset + length] = data
                        written.append((offset, length))
                    elif kind == "zeroes":
                        nursery.start_soon(backend.write_zeroes, offset, length, True)
                        model[offset : offset + length] = bytes(length)
                        written.append((offset, length))
                    else:
                        nursery.start_soon(backend.discard, offset, length)
                        discarded.append((offset, length))
            got = await backend.read(0, len(model))
            for offset, length in discarded:  # advisory: each byte as before, or zero
                after = got[offset : offset + length]
                before = model[offset : offset + length]
                assert all(a in (b, 0) for a, b in zip(after, before, strict=True))
                model[offset : offset + length] = after
            assert got == model
    finally:
        await layer.close()
    check(image)
    assert to_raw(image) == model
    qemu_reads(image, model, written)


async def test_overlapping_allocating_writes_leave_one_or_the_other(images: Path) -> None:
    """Writes over the same bytes of an unallocated cluster, in flight together: the
    second waits for the first's allocation and then writes in place, so each cluster
    holds one write's bytes where they overlap, and the rest of each."""
    image = VARIANTS["overlay"](images)
    before = to_raw(image)
    layer = BlockLayer()
    try:
        backend = await open_slow(layer, image, "20ms")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.write, 100 * KiB, b"\1" * (40 * KiB))
            nursery.start_soon(backend.write, 110 * KiB, b"\2" * (40 * KiB))
        got = await backend.read(0, len(before))
    finally:
        await layer.close()
    overlap = got[110 * KiB : 140 * KiB]
    assert overlap in (b"\1" * (30 * KiB), b"\2" * (30 * KiB))
    assert got[100 * KiB : 110 * KiB] == b"\1" * (10 * KiB)
    assert got[140 * KiB : 150 * KiB] == b"\2" * (10 * KiB)
    assert got[: 100 * KiB] == before[: 100 * KiB] and got[150 * KiB :] == before[150 * KiB :]
    check(image)
    assert to_raw(image) == got
    qemu_reads(image, got, [(100 * KiB, 50 * KiB)])


@needs_fuse
@pytest.mark.parametrize("variant", ["v3-64k", "overlay"])
def test_qemu_io_writes_in_flight_over_nbd_sharing_clusters_match_qemu_img_compare(
    mount_factory: Callable[..., Mount], images: Path, variant: str
) -> None:
    """QEMU's NBD client keeps qemu-io's aio_writes in flight together (the FUSE file
    cannot: the kernel serialises direct writes to one file): 24 KiB slices, each in a
    64 KiB cluster that other slices share, over a backing file too, every host write
    held 1 ms as a disk's would be. The image qemu-img compares with a raw file given the
    same writes, and checks clean."""
    image = VARIANTS[variant](images)
    reference = bytearray(to_raw(image))
    sock = images / "nbd.sock"
    mount = mount_factory(
        "--backend",
        "d=driver=qcow2,file.driver=blkdebug,file.delay.write=1ms,"
        f"file.image.driver=file,file.image.filename={image}",
        "--nbd",
        f"unix:{sock}",
        "--export",
        "d writable=on",
    )
    slice_ = 24 * KiB
    commands: list[str] = []
    for number, offset in enumerate(range(0, len(reference) - slice_ + 1, slice_)):
        pattern = number % 250 + 1
        commands += ["-c", f"aio_write -P {pattern} {offset} {slice_}"]
        reference[offset : offset + slice_] = bytes([pattern]) * slice_
    result = subprocess.run(
        ["qemu-io", "-f", "raw", *commands, "-c", "aio_flush", f"nbd+unix:///d?socket={sock}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "fail" not in result.stdout.lower(), result.stdout
    mount.stop()
    (images / "reference.raw").write_bytes(reference)
    check(image)
    assert "Images are identical" in qemu(
        "qemu-img", "compare", "-f", "raw", "-F", "qcow2", images / "reference.raw", image
    )
