"""Backend files through a real mount: dd and cat read and write as on a disk."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount, errno_of, node, pattern_image

pytestmark = [needs_fuse, pytest.mark.fuse]
MiB = 1 << 20


@pytest.fixture
def disk(mount_factory, images: Path) -> tuple[Mount, Path, bytes]:
    image = images / "disk.img"
    data = pattern_image(image, 8 * MiB, image_id=1)
    return mount_factory("--backend", f"disk0={image}"), image, data


def test_cat_reads_the_image_byte_for_byte(disk) -> None:
    mount, _image, data = disk
    out = subprocess.run(["cat", str(mount / "disk0")], capture_output=True, check=True).stdout
    assert out == data
    assert os.stat(mount / "disk0").st_size == len(data)


def test_dd_writes_reach_the_image_and_o_trunc_is_ignored(disk) -> None:
    mount, image, data = disk
    payload = os.urandom(MiB + 12345)
    src = image.with_name("payload")
    src.write_bytes(payload)
    # no conv=notrunc: dd opens with O_TRUNC, which a disk ignores
    subprocess.run(
        [
            "dd",
            f"if={src}",
            f"of={mount / 'disk0'}",
            "bs=64k",
            "seek=3",
            "oflag=seek_bytes",
            "status=none",
        ],
        check=True,
    )
    assert os.stat(mount / "disk0").st_size == len(data)
    expected = data[:3] + payload + data[3 + len(payload) :]
    assert image.read_bytes() == expected
    assert (mount / "disk0").read_bytes() == expected


def test_unaligned_reads_and_short_read_only_at_the_end(disk) -> None:
    mount, _, data = disk
    with open(mount / "disk0", "rb", buffering=0) as f:
        f.seek(4093)
        assert f.read(10) == data[4093:4103]
        f.seek(len(data) - 5)
        assert f.read(100) == data[-5:]
        assert f.read(100) == b""


def test_write_past_the_end_is_enospc_and_changes_nothing_beyond(disk) -> None:
    mount, image, data = disk
    fd = os.open(mount / "disk0", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"x" * 10, len(data) - 4) == 4  # a disk takes what fits
        assert errno_of(os.pwrite, fd, b"y", len(data)) == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(mount / "disk0").st_size == len(data)
    assert image.read_bytes() == data[:-4] + b"xxxx"


def test_fsync_reaches_the_host_file(disk) -> None:
    mount, image, _ = disk
    fd = os.open(mount / "disk0", os.O_WRONLY)
    try:
        os.pwrite(fd, b"durable", 0)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert image.read_bytes()[:7] == b"durable"
    assert mount.backends()["disk0"]["stats"]["flush_ops"] >= 2


def test_truncate_resizes_a_resizable_medium(disk) -> None:
    mount, image, data = disk
    subprocess.run(["truncate", "-s", "16M", str(mount / "disk0")], check=True)
    assert os.stat(mount / "disk0").st_size == 16 * MiB
    assert image.stat().st_size == 16 * MiB
    assert (mount / "disk0").read_bytes()[: len(data)] == data


def test_truncate_of_a_fixed_medium_fails_cleanly(mount_factory) -> None:
    mount = mount_factory("--backend", "n=driver=raw,offset=4k,size=1M,file.driver=null")
    result = subprocess.run(["truncate", "-s", "2M", str(mount / "n")], capture_output=True)
    assert result.returncode != 0
    assert os.stat(mount / "n").st_size == MiB


def test_read_only_medium_is_0444_and_refuses_writes(mount_factory, images: Path) -> None:
    image = images / "ro.img"
    data = pattern_image(image, MiB, image_id=2)
    mount = mount_factory("--backend", f"cd={image},read-only=on")
    assert os.stat(mount / "cd").st_mode & 0o777 == 0o444
    assert errno_of(os.open, mount / "cd", os.O_WRONLY) == errno.EROFS
    assert image.read_bytes() == data


def test_st_blocks_follows_allocation(mount_factory, images: Path) -> None:
    image = images / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    mount = mount_factory("--backend", f"s={image}")
    before = os.stat(mount / "s").st_blocks
    with open(mount / "s", "r+b", buffering=0) as f:
        f.write(os.urandom(MiB))
    after = os.stat(mount / "s").st_blocks
    assert before * 512 < MiB <= after * 512 < 64 * MiB


def test_mtime_changes_on_write(disk) -> None:
    mount, _, _ = disk
    before = os.stat(mount / "disk0").st_mtime_ns
    with open(mount / "disk0", "r+b", buffering=0) as f:
        f.write(b"tick")
    assert os.stat(mount / "disk0").st_mtime_ns > before


def test_a_refused_first_sector_write_says_why_in_ctl_error_and_the_log(disk) -> None:
    """dd only shows "Operation not permitted": the reason is in .ctl/error and the log."""
    mount, image, data = disk
    header = b"QFI\xfb" + bytes(508)  # a qcow2 magic on a probed raw image
    result = subprocess.run(
        ["dd", f"of={mount / 'disk0'}", "bs=512", "count=1", "conv=notrunc", "status=none"],
        input=header,
        capture_output=True,
    )
    assert result.returncode != 0 and os.strerror(errno.EPERM).encode() in result.stderr
    assert (
        "write disk0: raw: refusing a write that would make the probed raw image look like qcow2"
        in mount.last_error()
        and mount.last_error().endswith("[EPERM]")
    )
    assert "refusing a write that would make the probed raw image" in mount.log.read_text()
    assert image.read_bytes() == data


def test_a_page_aligned_1_mib_read_or_write_is_one_request(disk) -> None:
    """What a media change cannot split (README, media changes): one FUSE request, which
    libfuse negotiates up to 1 MiB (the kernel's default max_pages_limit is 256 pages). A
    buffer that is not page-aligned spans one page more and is split in two."""
    mount, _image, data = disk

    def requests(call: Any) -> tuple[int, int]:
        before = mount.backends()["disk0"]["stats"]
        call()
        after = mount.backends()["disk0"]["stats"]
        return (after["read_ops"] - before["read_ops"], after["write_ops"] - before["write_ops"])

    buf = mmap.mmap(-1, 2 * MiB)  # page-aligned, as dd's and cat's buffers are
    fd = os.open(mount / "disk0", os.O_RDWR)
    try:
        assert requests(lambda: os.preadv(fd, [buf], 0)) == (2, 0)  # 2 MiB: two requests
        assert requests(lambda: os.preadv(fd, [memoryview(buf)[:MiB]], MiB)) == (1, 0)
        assert buf[:MiB] == data[MiB : 2 * MiB]
        assert requests(lambda: os.pwritev(fd, [memoryview(buf)[:MiB]], 0)) == (0, 1)
        assert requests(lambda: os.preadv(fd, [memoryview(buf)[100 : 100 + MiB]], 0)) == (2, 0)
    finally:
        os.close(fd)


def test_the_kernel_sends_requests_of_one_mebibyte(disk) -> None:
    """FUSE's max_pages is negotiated at 1 MiB (256 pages): a 4 MiB O_DIRECT dd reaches the
    backend as 1 MiB requests, so sequential I/O and a media change see whole MiBs."""
    mount, image, _data = disk
    data = os.urandom(8 * MiB)  # not zeros, which zero detection would turn into zeroing
    src = image.with_name("payload")
    src.write_bytes(data)
    subprocess.run(
        [
            "dd",
            f"if={src}",
            f"of={mount / 'disk0'}",
            "bs=4M",
            "count=2",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
        check=True,
    )
    subprocess.run(
        ["dd", f"if={mount / 'disk0'}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"],
        check=True,
    )
    stats = mount.backends()["disk0"]["stats"]
    assert stats["write_bytes"] == len(data) and stats["write_ops"] == len(data) // MiB
    assert stats["read_bytes"] == len(data) and stats["read_ops"] == len(data) // MiB


def test_writes_from_a_buffer_off_a_page_boundary_read_back_only_their_edge_sectors(
    disk,
) -> None:
    """fio's buffers sit 16 bytes into a page, so the kernel splits each 1 MiB write at its
    256-page limit into 1 MiB - 16 bytes and 16 bytes, neither in whole sectors. A probed
    raw image is written in whole sectors (its first one is checked): each piece reads
    back the sector it covers in part, not its whole range, and the data arrive whole,
    durable at fsync."""
    mount, image, data = disk
    payload = os.urandom(4 * MiB)
    buf = mmap.mmap(-1, MiB + mmap.PAGESIZE)
    view = memoryview(buf)[16 : 16 + MiB]
    fd = os.open(mount / "disk0", os.O_WRONLY)
    try:
        before = mount.backends()["disk0"]
        for i in range(4):
            view[:] = payload[i * MiB : (i + 1) * MiB]
            assert os.pwrite(fd, view, MiB + i * MiB) == MiB
        os.fsync(fd)
        after = mount.backends()["disk0"]
    finally:
        view.release()
        os.close(fd)
    host = node(after["tree"], "#node0")["stats"]
    host_before = node(before["tree"], "#node0")["stats"]
    assert after["stats"]["write_ops"] - before["stats"]["write_ops"] == 8  # split in two
    assert host["read_bytes"] - host_before["read_bytes"] <= 8 * 512
    assert host["write_bytes"] - host_before["write_bytes"] == 4 * (MiB + 512)  # a sector twice
    expected = data[:MiB] + payload + data[5 * MiB :]
    assert image.read_bytes() == expected
    assert (mount / "disk0").read_bytes() == expected
