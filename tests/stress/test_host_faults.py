"""Faults from below: the image's host filesystem fills up (a 16 MiB tmpfs mounted by the
test), and a layer under or over the format returns EIO (blkdebug). The failing request gets
the errno (with ``werror=report``; the default pauses on a full host, see
tests/fuse/test_error_policy.py), other requests work, the metadata stays consistent
(``qemu-img check``: leaks at most), and once space returns writing works again with nothing
lost."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.compat.peers import MiB, qemu, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, errno_of, mounted, tmpfs

pytestmark = [needs_fuse, needs_qemu]

KiB = 1024
CHUNK = 256 * KiB
VIRTUAL = 8 * MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted after the test (after its blkfs mounts, which are set up
    later and so torn down first)."""
    with tmpfs(tmp_path / "small", "16m") as path:
        yield path


def qemu_check(image: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "check", *flags, str(image)], capture_output=True, text=True, timeout=120
    )


def fill(directory: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on the filesystem."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\xff" * max(0, free - leave))
    return filler


def pattern(index: int) -> bytes:
    return random.Random(index).randbytes(CHUNK)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_full_host_filesystem_fails_the_write_with_enospc_and_nothing_else(
    fmt: str,
    small_fs: Path,
    tmp_path: Path,
    mount_factory: Callable[..., Mount],
    figures: dict[str, Any],
) -> None:
    image = small_fs / f"disk.{fmt}"
    qemu("qemu-img", "create", "-q", "-f", fmt, image, str(VIRTUAL))
    filler = fill(small_fs, leave=3 * MiB)
    mount = mount_factory("--backend", f"disk={image},werror=report")  # not paused
    disk = mount / "disk"

    fd = os.open(disk, os.O_RDWR)
    try:
        written: dict[int, bytes] = {}
        failure = 0
        for index in range(VIRTUAL // CHUNK):  # fill until the host refuses
            try:
                os.pwrite(fd, pattern(index), index * CHUNK)
            except OSError as exc:
                failure = exc.errno or -1
                break
            written[index] = pattern(index)
        assert failure == errno.ENOSPC, f"expected ENOSPC, got {errno.errorcode.get(failure)}"
        assert written, "not even one write fitted: the test's space budget is off"
        figures[f"enospc_{fmt}_chunks_before_full"] = len(written)
        dd = subprocess.run(
            [
                "dd",
                "if=/dev/urandom",
                f"of={disk}",
                "bs=1M",
                "count=2",
                "seek=4",
                "conv=notrunc,fsync",
                "status=none",
            ],
            capture_output=True,
            text=True,
        )
        assert dd.returncode != 0 and "No space left on device" in dd.stderr, dd.stderr
        for index, data in written.items():  # reads still work, and see every write
            assert os.pread(fd, CHUNK, index * CHUNK) == data
        assert mount.alive()
        if fmt == "qcow2":
            check = qemu_check(image, "-U")
            assert check.returncode in (0, 3), check.stdout + check.stderr

        filler.unlink()  # space returns: the same writes now succeed
        for index in range(VIRTUAL // CHUNK):
            os.pwrite(fd, pattern(index), index * CHUNK)
            written[index] = pattern(index)
        os.fsync(fd)
        for index, data in written.items():
            assert os.pread(fd, CHUNK, index * CHUNK) == data
    finally:
        os.close(fd)
    mount.stop()
    if fmt == "qcow2":
        check = qemu_check(image)
        assert check.returncode in (0, 3), check.stdout + check.stderr
        out = tmp_path / "contents.raw"
        qemu("qemu-img", "convert", "-O", "raw", image, out)
        contents = out.read_bytes()
    else:
        contents = image.read_bytes()
    assert contents == b"".join(written[i] for i in range(VIRTUAL // CHUNK))


def test_eio_injected_over_qcow2_fails_only_the_matching_request(
    images: Path, mount_factory: Callable[..., Mount]
) -> None:
    image = images / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", image, str(8 * MiB))
    bad = (3 * MiB, 64 * KiB)
    mount = mount_factory(
        "--backend",
        f"disk=driver=blkdebug,inject-error.0.event=write,"
        f"inject-error.0.offset={bad[0]},"
        f"inject-error.0.length={bad[1]},"
        f"image.driver=qcow2,image.file.driver=file,"
        f"image.file.filename={image}",
    )
    expected = bytearray(8 * MiB)
    fd = os.open(mount / "disk", os.O_RDWR)
    try:
        failed = []
        for offset in range(0, 8 * MiB, 64 * KiB):
            data = random.Random(offset).randbytes(64 * KiB)
            code = errno_of(os.pwrite, fd, data, offset)
            if code:
                failed.append((offset, code))
            else:
                expected[offset : offset + len(data)] = data
        os.fsync(fd)
        assert failed == [(bad[0], errno.EIO)]
        assert os.pread(fd, 8 * MiB, 0) == expected
    finally:
        os.close(fd)
    mount.stop()
    check = qemu_check(image)
    assert check.returncode == 0, check.stdout + check.stderr
    assert to_raw(image) == expected


def test_eio_from_under_qcow2_keeps_its_metadata_consistent(
    images: Path, mount_factory: Callable[..., Mount], figures: dict[str, Any]
) -> None:
    """Errors on a third of the host writes under qcow2, data and metadata alike: failed
    requests get EIO, acknowledged and fsynced writes read back, and the image checks clean
    once the errors stop."""
    image = images / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, str(8 * MiB))
    mount = mount_factory(
        "--backend",
        f"disk=driver=qcow2,file.driver=blkdebug,"
        f"file.node-name=dbg,file.image.driver=file,"
        f"file.image.filename={image}",
    )
    mount.ctl(
        "reopen",
        "dbg inject-error.0.event=write,inject-error.0.probability=0.3,"
        "inject-error.0.seed=7,inject-error.1.event=flush,"
        "inject-error.1.probability=0.3,inject-error.1.seed=8",
    )
    rng = random.Random(5)
    expected = bytearray(8 * MiB)
    uncertain: list[tuple[int, int]] = []
    counts = {"writes": 0, "write_eio": 0, "fsyncs": 0, "fsync_eio": 0}
    fd = os.open(mount / "disk", os.O_RDWR)
    try:
        for n in range(400):
            length = rng.choice((512, 4096, 20000, 65536))
            offset = rng.randrange(0, 8 * MiB - length)
            data = rng.randbytes(length)
            code = errno_of(os.pwrite, fd, data, offset)
            counts["writes"] += 1
            if code:
                assert code == errno.EIO
                counts["write_eio"] += 1
                uncertain.append((offset, offset + length))
            else:
                expected[offset : offset + length] = data
            if n % 10 == 9:
                counts["fsyncs"] += 1
                code = errno_of(os.fsync, fd)
                assert code in (0, errno.EIO)
                counts["fsync_eio"] += bool(code)
        mount.ctl("reopen", "dbg inject-error=none")
        os.fsync(fd)
        actual = os.pread(fd, 8 * MiB, 0)
    finally:
        os.close(fd)
    mount.stop()
    check = qemu_check(image)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    on_disk = to_raw(image)
    assert on_disk == actual, "qemu-img reads other contents than blkfs served"
    mask = bytearray(8 * MiB)
    for start, end in uncertain:
        mask[start:end] = b"\1" * (end - start)
    lost = [
        o
        for o in range(0, 8 * MiB, 4096)
        if any(
            a != e and not m
            for a, e, m in zip(
                actual[o : o + 4096], expected[o : o + 4096], mask[o : o + 4096], strict=False
            )
        )
        and actual[o : o + 4096] != expected[o : o + 4096]
    ]
    assert not lost, f"acknowledged writes lost at {lost[:10]}"
    assert counts["write_eio"] and counts["fsync_eio"], counts
    figures.update(counts, leaks_left=check.returncode == 3)


def test_unmount_after_a_failed_final_flush_still_unmounts(
    small_fs: Path, mount_factory: Callable[..., Mount]
) -> None:
    """The disk is full when the daemon writes back its metadata on unmount: the flush
    fails, but the daemon still unmounts and exits (no dead mount left behind)."""
    image = small_fs / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, str(32 * MiB))
    filler = fill(small_fs, leave=2 * MiB)
    mount = mount_factory("--backend", f"disk={image},werror=report")
    fd = os.open(mount / "disk", os.O_RDWR)
    for index in range(0, 32 * MiB // CHUNK, 3):  # spread: many L2 entries dirty
        if errno_of(os.pwrite, fd, pattern(index)[:4096], index * CHUNK):
            break
    filler.unlink()
    fill(small_fs, leave=0)
    assert errno_of(os.close, fd) == errno.ENOSPC  # close flushes, and the flush fails
    mount.stop()
    assert not mounted(mount.path) and not mount.alive()
    assert "No space left on device" in mount.log.read_text()  # the final flush did fail
    check = qemu_check(image)
    assert check.returncode in (0, 3), check.stdout + check.stderr
