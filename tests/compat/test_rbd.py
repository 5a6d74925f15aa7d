"""The rbd driver against a real (throwaway, single-node) Ceph cluster, with Ceph's and
QEMU's tools as the peers: what blkfs writes, ``rbd export`` and ``qemu-img`` read
byte-identically; what ``rbd import`` and ``qemu-img convert`` write, blkfs reads so; blkfs's
block status agrees with ``rbd diff``."""

from __future__ import annotations

import errno
import json
import random
import subprocess
from pathlib import Path

import pytest

from blkfs.backend import Status
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.ceph import POOL, Cluster, needs_ceph
from tests.compat.peers import MiB, qemu, source
from tests.conftest import needs_fuse
from tests.helpers import blkfs, run

pytestmark = [needs_ceph, pytest.mark.qemu]
SIZE = 8 * MiB


async def test_writes_read_back_through_rbd_export_and_qemu_img(
    ceph: Cluster, tmp_path: Path
) -> None:
    name = ceph.image(SIZE)
    model = bytearray(SIZE)
    rng = random.Random(3)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        assert backend.length() == SIZE
        for _ in range(30):
            offset, data = rng.randrange(SIZE - 300000), rng.randbytes(rng.randrange(1, 300000))
            await backend.write(offset, data, fua=rng.random() < 0.2)
            model[offset : offset + len(data)] = data
        for unmap in (False, True):
            offset, length = rng.randrange(SIZE - 2 * MiB), rng.randrange(1, 2 * MiB)
            await backend.write_zeroes(offset, length, unmap=unmap)
            model[offset : offset + length] = bytes(length)
        await backend.discard(6 * MiB, 2 * MiB)  # whole objects: they go, reading as zeros
        model[6 * MiB :] = bytes(2 * MiB)
        await backend.flush()
        assert await backend.read(0, SIZE) == model
    finally:
        await layer.close()
    exported = tmp_path / "export.raw"
    ceph.run("rbd", "export", f"{POOL}/{name}", str(exported))
    assert exported.read_bytes() == model
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(exported), "-F", "raw", ceph.spec(name)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_imported_and_converted_images_read_identically(
    ceph: Cluster, tmp_path: Path
) -> None:
    path = source(tmp_path / "src.raw", SIZE)
    imported, converted = ceph.image(), ceph.image()
    ceph.run("rbd", "import", str(path), f"{POOL}/{imported}")
    qemu("qemu-img", "convert", "-f", "raw", "-O", "raw", path, ceph.spec(converted))
    layer = BlockLayer()
    try:
        for name in (imported, converted):
            backend = await layer.create(name, ceph.spec(name))
            assert await backend.read(0, SIZE) == path.read_bytes(), name
    finally:
        await layer.close()


async def test_block_status_agrees_with_rbd_diff(ceph: Cluster) -> None:
    """Whole objects, as ``rbd diff --whole-object`` (and QEMU) report them from the object
    map: allocated data, or a hole that reads as zeros."""
    name = ceph.image()
    ceph.run("rbd", "create", "--size", f"{SIZE}B", "--object-size", "1M", f"{POOL}/{name}")
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        for offset in (0, 3 * MiB + 5, 4 * MiB, 7 * MiB):
            await backend.write(offset, b"x" * 5000)
        runs: list[tuple[int, int]] = []
        position = 0
        while position < SIZE:
            extent = await backend.block_status(position, SIZE - position)
            if Status.DATA in extent.status:
                assert Status.ZERO not in extent.status
                runs.append((position, extent.length))
            else:
                assert Status.ZERO in extent.status
            position += extent.length
    finally:
        await layer.close()
    diff = json.loads(
        ceph.run("rbd", "diff", "--whole-object", "--format", "json", f"{POOL}/{name}")
    )
    assert merged(runs) == merged([(e["offset"], e["length"]) for e in diff if e["exists"]])
    assert merged(runs) == [(0, MiB), (3 * MiB, 2 * MiB), (7 * MiB, MiB)]


Runs = list[tuple[int, int]]


def merged(runs: Runs) -> Runs:
    out: Runs = []
    for offset, length in runs:
        if out and sum(out[-1]) == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def test_image_create_and_info_and_qemu_img_agree(ceph: Cluster) -> None:
    name = ceph.image()
    blkfs("image", "create", "-f", "raw", ceph.spec(name), "24M")
    info = json.loads(ceph.run("rbd", "info", "--format", "json", f"{POOL}/{name}"))
    assert info["size"] == 24 * MiB
    again = blkfs("image", "create", ceph.spec(name), "1M", check=False)
    assert again.returncode and "exists" in again.stderr
    assert json.loads(ceph.run("rbd", "info", "--format", "json", f"{POOL}/{name}"))["size"] == (
        24 * MiB
    )  # the failed create changed nothing
    ceph.run("rbd", "snap", "create", f"{POOL}/{name}@monday")
    ours = json.loads(blkfs("image", "info", "--json", ceph.spec(name)).stdout)
    theirs = json.loads(qemu("qemu-img", "info", "--output=json", ceph.spec(name)))
    assert (ours["format"], ours["virtual-size"]) == (theirs["format"], theirs["virtual-size"])
    assert [s["name"] for s in ours["format-specific"]["snapshots"]] == [
        s["name"] for s in theirs["snapshots"]
    ]


async def test_a_snapshot_reads_what_was_there_and_is_read_only(ceph: Cluster) -> None:
    name = ceph.image(SIZE)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        await backend.write(0, b"before" * 1000)
        await backend.flush()
        ceph.run("rbd", "snap", "create", f"{POOL}/{name}@s1")
        await backend.write(0, b"after!" * 1000)
        await backend.flush()
        with pytest.raises(BlockError) as refused:
            await layer.create("s", ceph.spec(name, "@s1"))
        assert refused.value.errno == errno.EROFS
        assert "s" not in layer
        snap = await layer.create("s", f"{ceph.spec(name, '@s1')},read-only=on")
        assert await snap.read(0, 6000) == b"before" * 1000
        assert await backend.read(0, 6000) == b"after!" * 1000
        with pytest.raises(BlockError) as written:
            await snap.write(0, b"x")
        assert written.value.errno == errno.EROFS
    finally:
        await layer.close()
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", ceph.spec(name, "@s1"), "-F", "raw", ceph.spec(name)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stdout + result.stderr  # they differ at 0


@pytest.mark.fuse
@needs_fuse
async def test_rbd_fuse_reads_what_blkfs_wrote(ceph: Cluster, tmp_path: Path) -> None:
    name = ceph.image(SIZE)
    data = random.Random(4).randbytes(SIZE)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        await backend.write(0, data)
        await backend.flush()
    finally:
        await layer.close()
    where = tmp_path / "rbd-fuse"
    where.mkdir()
    run("rbd-fuse", "-c", str(ceph.conf), "-p", POOL, str(where))
    try:
        assert (where / name).read_bytes() == data
    finally:
        subprocess.run(["fusermount3", "-u", str(where)], check=True, timeout=60)
