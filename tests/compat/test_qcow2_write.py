"""What blkfs writes, QEMU reads: random writes, zero writes, discards and a resize through
blkfs leave images that ``qemu-img check`` passes and ``qemu-img compare`` finds identical
to a raw file that received the same operations."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, check, convert, create, qemu, qemu_io, source, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, blkfs

pytestmark = [needs_qemu]

VARIANTS: dict[str, Callable[[Path], Path]] = {
    "v3-64k": lambda d: create(d, "img.qcow2"),
    "c512": lambda d: create(d, "img.qcow2", "cluster_size=512"),
    "c4k-refcount1": lambda d: create(d, "img.qcow2", "cluster_size=4k,refcount_bits=1"),
    "refcount64": lambda d: create(d, "img.qcow2", "refcount_bits=64"),
    "extl2": lambda d: create(d, "img.qcow2", "extended_l2=on"),
    "v2": lambda d: create(d, "img.qcow2", "compat=0.10"),
    "compressed": lambda d: convert(d, "img", "cluster_size=16k", compress=True),
    "compressed-zstd": lambda d: convert(
        d, "img", "cluster_size=16k,compression_type=zstd", compress=True
    ),
    "overlay": lambda d: create(d, "img.qcow2", backing=convert(d, "base").name),
    "overlay-v2": lambda d: create(
        d, "img.qcow2", "compat=0.10", backing=convert(d, "base", "compat=0.10").name
    ),
    "overlay-extl2": lambda d: create(
        d, "img.qcow2", "extended_l2=on,cluster_size=32k", backing=convert(d, "base").name
    ),
    "overlay-short-raw-backing": lambda d: create(
        d, "img.qcow2", backing=source(d / "base.raw", size=MiB).name, backing_fmt="raw"
    ),
}


def random_ops(rng: random.Random, size: int, count: int) -> list[tuple[str, int, int]]:
    """(kind, offset, length): unaligned data writes, zero writes of every shape, and one
    resize (offset = new size) somewhere in the middle."""
    ops: list[tuple[str, int, int]] = []
    resize_at = count // 2
    for i in range(count):
        if i == resize_at:
            size += rng.choice((64 << 10, MiB + 512, 3 * MiB))
            ops.append(("resize", size, 0))
            continue
        length = rng.choice((1, 511, 4096, 65536, 70000, 300000, MiB + 3))
        offset = rng.randrange(0, max(1, size - length))
        if rng.random() < 0.3:
            offset -= offset % 65536  # cluster-aligned sometimes, so whole clusters change
        ops.append((rng.choice(("data", "data", "zeros")), offset, min(length, size - offset)))
    return ops


@needs_fuse
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mount_writes_pass_check_and_compare(
    mount_factory: Callable[..., Mount], images: Path, variant: str
) -> None:
    """Zero writes arrive as write_zeroes with unmap (detect-zeroes=unmap), as a guest's
    do over virtio-blk with discard=unmap."""
    image = VARIANTS[variant](images)
    reference = images / "reference.raw"
    reference.write_bytes(to_raw(image))
    mount = mount_factory(
        "--image-dir",
        str(images),
        "--backend",
        f"d=driver=qcow2,detect-zeroes=unmap,file.driver=file,file.filename={image}",
    )
    rng = random.Random(variant)
    disk = os.open(mount / "d", os.O_RDWR)
    ref = os.open(reference, os.O_RDWR)
    try:
        for kind, offset, length in random_ops(rng, os.fstat(disk).st_size, 40):
            if kind == "resize":
                os.truncate(mount / "d", offset)
                os.ftruncate(ref, offset)
                continue
            data = rng.randbytes(length) if kind == "data" else bytes(length)
            assert os.pwrite(disk, data, offset) == length
            os.pwrite(ref, data, offset)
        os.fsync(disk)
        assert os.pread(disk, os.fstat(ref).st_size + 1, 0) == reference.read_bytes()
    finally:
        os.close(disk)
        os.close(ref)
    mount.stop()
    check(image)
    assert "Images are identical" in qemu(
        "qemu-img", "compare", "-f", "raw", "-F", "qcow2", reference, image
    )


def qemu_map(image: Path) -> list[dict[str, object]]:
    return list(json.loads(qemu("qemu-img", "map", "--output=json", image)))


@needs_fuse
@pytest.mark.parametrize("options", ["", "extended_l2=on", "compat=0.10"])
def test_zero_range_keeps_the_clusters_as_qemu_does(
    mount_factory: Callable[..., Mount], images: Path, options: str
) -> None:
    """``fallocate -z`` (what a loop device sends for ``blkdiscard -z``) zeroes without
    may-unmap: the clusters stay allocated (the zero flag on an allocated cluster; written
    zeros in a v2 image), and a later write into the range takes no new space.
    ``fallocate -p`` may unmap, and frees them. The result reads as qemu-io's ``write -z``
    and, with standard L2 entries, maps as it does (QEMU zeroes the partial clusters at the
    ends by subclusters with extended L2, where blkfs writes zeros, and frees the clusters
    of a v2 image, which has no zero flag)."""
    image = create(images, "z.qcow2", options, size=16 * MiB)
    data = random.Random(12).randbytes(8 * MiB)
    mount = mount_factory("--backend", f"d={image}")
    (mount / "d").write_bytes(data)
    mount.stop()
    reference = images / "reference.qcow2"
    reference.write_bytes(image.read_bytes())
    zero_at, zero_len = 2 * MiB + 4096, 4 * MiB  # unaligned: partial clusters at both ends
    qemu_io(reference, "qcow2", f"write -z {zero_at} {zero_len}")

    size, used = image.stat().st_size, image.stat().st_blocks
    mount = mount_factory("--backend", f"d={image}")
    subprocess.run(
        ["fallocate", "-z", "-n", "-o", str(zero_at), "-l", str(zero_len), str(mount / "d")],
        check=True,
    )
    assert (mount / "d").read_bytes()[: 8 * MiB] == data[:zero_at] + bytes(zero_len) + data[
        zero_at + zero_len :
    ]
    mount.stop()
    assert subprocess.run(["qemu-img", "check", str(image)]).returncode == 0
    assert image.stat().st_size == size and image.stat().st_blocks >= used
    if not options:
        assert qemu_map(image) == qemu_map(reference)
    assert "Images are identical" in qemu("qemu-img", "compare", reference, image)

    mount = mount_factory("--backend", f"d={image}")
    with open(mount / "d", "r+b") as disk:  # into the zeroed clusters: no new cluster
        disk.seek(3 * MiB)
        disk.write(b"\x5a" * MiB)
    mount.stop()
    assert image.stat().st_size == size
    assert subprocess.run(["qemu-img", "check", str(image)]).returncode == 0
    assert to_raw(image)[3 * MiB : 4 * MiB] == b"\x5a" * MiB

    mount = mount_factory("--backend", f"d={image}")
    subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(8 * MiB), str(mount / "d")], check=True)
    mount.stop()
    check(image)
    assert image.stat().st_blocks * 512 < used * 512 - 6 * MiB  # freed, holes punched


@needs_fuse
@pytest.mark.parametrize("options", ["", "cluster_size=4k"])
def test_discarded_clusters_are_reused_so_the_image_stays_bounded(
    mount_factory: Callable[..., Mount], images: Path, options: str
) -> None:
    """Cycles of writes, ``fallocate -p`` and fsync through one mount (a filesystem made
    and remade with discard over a loop device): the clusters a discard frees are reused
    once that is durable, so the image file stays within the disk's size plus its metadata
    instead of growing by every cycle's writes."""
    size = 16 * MiB
    image = create(images, "thin.qcow2", options, size=size)
    mount = mount_factory("--backend", f"d={image}")
    rng = random.Random(11)
    model = bytearray(size)
    with open(mount / "d", "r+b", buffering=0) as disk:
        for _ in range(24):
            for _ in range(8):
                offset = rng.randrange(0, size - MiB, 4096)
                data = rng.randbytes(rng.choice((4096, 65536, 300000, MiB)))
                disk.seek(offset)
                disk.write(data)
                model[offset : offset + len(data)] = data
            os.fsync(disk.fileno())
            start = rng.randrange(0, size // 2, 65536)
            subprocess.run(
                ["fallocate", "-p", "-o", str(start), "-l", str(size // 2), str(mount / "d")],
                check=True,
            )
            model[start : start + size // 2] = bytes(size // 2)
            os.fsync(disk.fileno())
        disk.seek(0)
        assert disk.read() == model
    mount.stop()
    assert subprocess.run(["qemu-img", "check", str(image)]).returncode == 0
    assert to_raw(image) == model
    assert image.stat().st_size <= size + size // 8  # the disk, and room for its metadata


@pytest.mark.parametrize(
    "variant", ["v3-64k", "c512", "extl2", "v2", "overlay", "overlay-v2", "compressed"]
)
async def test_discards_and_zero_writes_through_the_backend_api(images: Path, variant: str) -> None:
    """Discard is advisory: afterwards each byte reads as before or as zero, and QEMU reads
    what blkfs reads."""
    image = VARIANTS[variant](images)
    model = bytearray(to_raw(image))
    layer = BlockLayer()
    backend = await layer.create("d", f"driver=qcow2,file.driver=file,file.filename={image}")
    rng = random.Random(variant)
    try:
        for _ in range(60):
            kind = rng.choice(("data", "discard", "discard", "zeroes"))
            length = rng.choice((1, 4096, 65536, 200000, MiB))
            offset = rng.randrange(len(model) - length)
            if kind == "data":
                data = rng.randbytes(length)
                await backend.write(offset, data)
                model[offset : offset + length] = data
            elif kind == "zeroes":
                await backend.write_zeroes(offset, length, unmap=rng.random() < 0.5)
                model[offset : offset + length] = bytes(length)
            else:
                await backend.discard(offset, length)
                after = await backend.read(offset, length)
                before = model[offset : offset + length]
                assert all(a in (b, 0) for a, b in zip(after, before, strict=True))
                model[offset : offset + length] = after
        assert await backend.read(0, len(model)) == model
    finally:
        await layer.close()
    check(image)
    assert to_raw(image) == model


CREATE_OPTIONS = [
    "",
    "cluster_size=512",
    "cluster_size=2M",
    "compat=0.10",
    "refcount_bits=1",
    "refcount_bits=64,cluster_size=4k",
    "extended_l2=on",
    "compression_type=zstd",
]


@pytest.mark.parametrize("options", CREATE_OPTIONS)
def test_created_images_pass_check_and_show_the_options(images: Path, options: str) -> None:
    image = images / "new.qcow2"
    args = ["image", "create", "-f", "qcow2", str(image), "5G"]
    blkfs(*args, *(["-o", options] if options else []))
    check(image)
    info = json.loads(qemu("qemu-img", "info", "--output=json", image))
    wanted = dict(item.split("=") for item in options.split(",") if item)
    specific = info["format-specific"]["data"]
    assert info["virtual-size"] == 5 << 30
    assert info["cluster-size"] == {"512": 512, "2M": 2 * MiB, "4k": 4096}.get(
        wanted.get("cluster_size", ""), 65536
    )
    assert specific["compat"] == wanted.get("compat", "1.1")
    assert specific["refcount-bits"] == int(wanted.get("refcount_bits", 16))
    if specific["compat"] == "1.1":
        assert specific["extended-l2"] == (wanted.get("extended_l2") == "on")
        assert specific["compression-type"] == wanted.get("compression_type", "zlib")
    qemu_io(image, "qcow2", "write -P 0x5a 1G 3M", "read -P 0x5a 1G 3M")
    check(image)


@pytest.mark.parametrize("options", ["", "cluster_size=512", "compat=0.10"])
async def test_a_zero_size_image_is_clean_and_grows(images: Path, options: str) -> None:
    """A zero-size image has no L1 table, as qemu-img makes it (an L1 cluster nothing names
    would be a leak), and still grows, in blkfs and in QEMU."""
    ours, theirs = images / "ours.qcow2", images / "theirs.qcow2"
    blkfs("image", "create", "-f", "qcow2", str(ours), "0", *(["-o", options] if options else []))
    create(images, theirs.name, options, size=0)
    result = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours.stat().st_size == theirs.stat().st_size
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"driver=qcow2,file.driver=file,file.filename={ours}")
        await backend.truncate(MiB)
        await backend.write(MiB - 4096, b"\7" * 4096)
    finally:
        await layer.close()
    assert "No errors were found" in check(ours)
    assert to_raw(ours) == bytes(MiB - 4096) + b"\7" * 4096


def test_create_refuses_bad_input_and_changes_nothing(images: Path) -> None:
    image = images / "x.qcow2"
    for args, message in [
        (["-o", "cluster_size=3k"], "cluster_size must be a power of two"),
        (["-o", "refcount_bits=3"], "refcount_bits"),
        (["-o", "bogus=1"], "unknown option"),
        (["-o", "compat=0.10,extended_l2=on"], "compat=0.10"),
        (["-b", "missing.qcow2"], "missing.qcow2"),
    ]:
        result = blkfs("image", "create", "-f", "qcow2", *args, str(image), "1M", check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not image.exists()
    image.write_bytes(b"precious")
    result = blkfs("image", "create", "-f", "raw", str(image), "1M", check=False)
    assert result.returncode == 1 and "never overwrites" in result.stderr
    assert image.read_bytes() == b"precious"


@needs_fuse
def test_a_chain_blkfs_wrote_reads_back_in_qemu(
    mount_factory: Callable[..., Mount], images: Path
) -> None:
    """base and overlay made by ``blkfs image create``, written through the mount; QEMU's
    convert of the overlay sees both layers, and ``blkfs image info`` reports the chain."""
    base, top = images / "base.qcow2", images / "top.qcow2"
    blkfs("image", "create", "-f", "qcow2", "-o", "cluster_size=4k", str(base), "8M")
    rng = random.Random(5)
    model = bytearray(8 * MiB)
    for image in (base, top):
        if image is top:
            blkfs("image", "create", "-f", "qcow2", "-b", base.name, str(top))
        mount = mount_factory("--image-dir", str(images), "--backend", f"d={image}")
        with open(mount / "d", "r+b", buffering=0) as disk:
            for _ in range(30):
                offset, data = rng.randrange(len(model) - 70000), rng.randbytes(70000)
                disk.seek(offset)
                disk.write(data)
                model[offset : offset + len(data)] = data
        mount.stop()
    for image in (base, top):
        check(image)
    assert to_raw(top) == model
    info = json.loads(blkfs("image", "info", "--json", str(top)).stdout)
    assert info["format-specific"]["backing-filename"] == base.name
    assert [layer["filename"] for layer in info["backing-chain"]] == [str(base)]
    qemu_info = json.loads(qemu("qemu-img", "info", "--output=json", top))
    assert qemu_info["backing-filename-format"] == "qcow2"
    assert qemu_info["virtual-size"] == info["virtual-size"]


def test_image_info_reads_what_qemu_made_and_survives_a_missing_backing(images: Path) -> None:
    base = convert(images, "base", "cluster_size=8k")
    top = create(images, "top.qcow2", "compression_type=zstd", backing=base.name)
    info = json.loads(blkfs("image", "info", "--json", str(top)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 * MiB
    assert info["format-specific"]["compression-type"] == "zstd"
    assert info["backing-chain"][0]["format-specific"]["cluster-size"] == 8192
    base.unlink()
    info = json.loads(blkfs("image", "info", "--json", str(top)).stdout)
    assert info["format"] == "qcow2"
    assert "base.qcow2" in info["backing-chain"][0]["error"]
    human = blkfs("image", "info", str(top)).stdout
    assert "virtual size: 4 MiB" in human and "unreadable" in human


async def test_writing_over_an_internal_snapshot_leaks_nothing(images: Path) -> None:
    """An L2 table shared with an internal snapshot is copied on the first write; the copy's
    data clusters were already counted for both tables, so copying adds no reference."""
    image = create(images, "snap.qcow2", size=4 * MiB)
    qemu_io(image, "qcow2", "write -P 1 0 3M")
    qemu("qemu-img", "snapshot", "-c", "before", image)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"driver=qcow2,file.driver=file,file.filename={image}")
        await backend.write(65536, b"\2" * 4096)
    finally:
        await layer.close()
    assert "No errors were found" in check(image)
    data = to_raw(image)
    assert data[65536:69632] == b"\2" * 4096
    assert data[:65536] == b"\1" * 65536 and data[69632 : 3 * MiB] == b"\1" * (3 * MiB - 69632)
    qemu("qemu-img", "snapshot", "-a", "before", image)  # the snapshot still has the old data
    assert to_raw(image)[: 3 * MiB] == b"\1" * (3 * MiB)


async def test_the_refcount_table_holds_only_its_used_entries_in_memory(tmp_path: Path) -> None:
    """A writable image keeps its refcount table up to the last block in use (a read-only
    one none at all); writes that need new refcount blocks, and one that moves the table,
    still leave an image qemu-img checks clean and reads byte for byte."""
    size = 12 * MiB
    image = create(tmp_path, "small.qcow2", "cluster_size=512", size=size)
    layer = BlockLayer()
    backend = await layer.create("d", f"driver=qcow2,file.driver=file,file.filename={image}")
    table = backend.root_node().driver.metadata.refcount_table  # type: ignore[attr-defined]
    assert 0 < len(table.entries) < table.room  # one 512-byte cluster has room for 64
    first_room = table.room  # 64 blocks of 256 clusters: 8 MiB of image file
    rng = random.Random(4)
    model = bytearray(size)
    for start in rng.sample(range(0, size, 64 << 10), k=(size >> 16) - 8):
        data = rng.randbytes(64 << 10)  # clusters all over: new refcount blocks
        await backend.write(start, data)
        model[start : start + len(data)] = data
    assert table.room > first_room  # the table moved to a larger place
    await layer.close()
    check(image)
    assert to_raw(image) == bytes(model)
    reader = BlockLayer()
    ro = await reader.create(
        "r", f"driver=qcow2,read-only=on,file.driver=file,file.filename={image}"
    )
    assert len(ro.root_node().driver.metadata.refcount_table.entries) == 0  # type: ignore[attr-defined]
    assert await ro.read(0, size) == model
    await reader.close()
