"""The rest of the disk contract through a real mount: discard and zeroing reach the image
from loop devices and fallocate (fstrim gives space back), and SEEK_DATA/SEEK_HOLE follow the
image's allocation, so sparse copies stay sparse."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.compat.peers import qemu, qemu_io
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import errno_of, loop_device, mounted_fs, run

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def qemu_data_ranges(image: Path) -> list[tuple[int, int]]:
    """[start, end) of what ``qemu-img map`` says holds data, merged."""
    ranges: list[tuple[int, int]] = []
    for extent in json.loads(qemu("qemu-img", "map", "--output=json", "-U", image)):
        if extent["data"]:
            start, end = extent["start"], extent["start"] + extent["length"]
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


def seek_data_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) of the data SEEK_DATA/SEEK_HOLE find in ``path``."""
    ranges = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        position = 0
        while position < size:
            try:
                start = os.lseek(f.fileno(), position, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, end))
            position = end
    return ranges


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("layout", ["plain", "overlay"])
def test_seek_data_and_hole_match_qemu_img_map(mount_factory, images: Path, layout: str) -> None:
    image = images / "disk.qcow2"
    if layout == "overlay":
        base = images / "base.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
        qemu_io(base, "qcow2", "write -P 1 1M 1M", "write -P 2 40M 64k")
        qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", image)
    else:
        qemu("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(
        image,
        "qcow2",
        "write -P 3 0 64k",
        "write -P 4 8M 3M",
        "write -z 9M 64k",
        "write -P 5 63M 1M",
    )
    expected = qemu_data_ranges(image)
    mount = mount_factory("--backend", f"d={image}")
    assert seek_data_ranges(mount / "d") == expected
    with open(mount / "d", "rb") as f:
        assert errno_of(os.lseek, f.fileno(), 64 * MiB, os.SEEK_DATA) == errno.ENXIO
        assert os.lseek(f.fileno(), 63 * MiB, os.SEEK_HOLE) == 64 * MiB  # the end is a hole

    copy = images / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(mount / "d"), str(copy)], check=True)
    assert copy.read_bytes() == (mount / "d").read_bytes()
    data = sum(end - start for start, end in expected)
    assert allocated(copy) <= data + MiB, "the copy is not sparse"


def test_fallocate_punches_and_zeroes_through_the_tree(mount_factory, images: Path) -> None:
    image = images / "disk.img"
    image.write_bytes(os.urandom(8 * MiB))
    mount = mount_factory("--backend", f"d={image}")
    disk = mount / "d"
    before = allocated(image)
    subprocess.run(["fallocate", "-p", "-o", "1M", "-l", "2M", str(disk)], check=True)
    subprocess.run(["fallocate", "-z", "-n", "-o", "5M", "-l", "1M", str(disk)], check=True)
    data = disk.read_bytes()
    assert data[MiB : 3 * MiB] == bytes(2 * MiB) and data[5 * MiB : 6 * MiB] == bytes(MiB)
    assert allocated(image) <= before - 2 * MiB + 64 * 1024, (
        "the punched hole did not reach the host"
    )  # (give or take an extent block)
    assert os.stat(disk).st_size == 8 * MiB
    assert (
        subprocess.run(
            ["fallocate", "-c", "-o", "0", "-l", "1M", str(disk)], capture_output=True
        ).returncode
        != 0
    )  # collapse: not for a disk


@needs_loop
@pytest.mark.loop
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_fstrim_through_a_loop_device_gives_space_back(
    mount_factory, images: Path, tmp_path: Path, fmt: str
) -> None:
    image = images / f"vol.{fmt}"
    qemu("qemu-img", "create", "-q", "-f", fmt, image, "256M")
    mount = mount_factory("--backend", f"vol={image}")
    with loop_device(mount / "vol") as device:
        run("mkfs.ext4", "-q", "-E", "nodiscard", device)
        with mounted_fs(device, tmp_path / "fs") as fs:
            (fs / "big").write_bytes(os.urandom(96 * MiB))
            os.sync()
            full = allocated(image)
            (fs / "big").unlink()
            os.sync()
            trimmed = run("fstrim", "-v", str(fs))
            assert "trimmed" in trimmed
            os.sync()
        freed = full - allocated(image)
        assert freed >= 64 * MiB, f"fstrim freed only {freed} bytes ({trimmed})"
        if fmt == "qcow2":
            data = sum(end - start for start, end in qemu_data_ranges(image))
            assert data < 32 * MiB, "the discarded clusters still show as data"

        run("e2fsck", "-fn", device)
        zeroed_before = mount.backends()["vol"]["tree"]["stats"]["zero_ops"]
        run("blkdiscard", "-z", "-o", "0", "-l", str(16 * MiB), device)
        with open(device, "rb") as dev:
            assert dev.read(16 * MiB) == bytes(16 * MiB)
        zeroed = mount.backends()["vol"]["tree"]["stats"]["zero_ops"] - zeroed_before
        assert zeroed > 0, "blkdiscard -z did not reach write_zeroes"
