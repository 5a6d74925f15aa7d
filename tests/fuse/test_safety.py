"""What users did that lost data, through a real mount: each test here failed on the code
before the fix it guards (issue #12).

* a media change to an overlay of the image a writer is writing;
* ``dd`` without ``conv=notrunc``, ``truncate`` and ``qemu-img convert`` shrinking a disk;
* eject and change under a loop device with a mounted ext4;
* a change while reads and writes are in flight (they finish on the old medium);
* ``blkfs umount`` while a deleted backend is still held by a loop device;
* a host flush that failed once turning into success on the next fsync.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.compat.peers import check as qemu_img_check
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import (
    Mount,
    blkfs,
    errno_of,
    flaky_disk,
    loop_device,
    mounted,
    mounted_fs,
    node,
    pattern_image,
    run,
    wait_until,
)
from tests.slow_writer import CHUNKS, chunk

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [needs_fuse, pytest.mark.fuse]
MiB = 1 << 20


@needs_qemu
def test_a_change_to_an_overlay_of_the_image_being_written_loses_nothing(
    mount_factory, images: Path
) -> None:
    base = images / "x.qcow2"
    blkfs("image", "create", "-f", "qcow2", str(base), "40M")
    mount = mount_factory("--backend", f"disk={base}")
    with subprocess.Popen(
        [sys.executable, "-m", "tests.slow_writer", str(mount / "disk")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as writer:
        assert writer.stdout is not None
        try:
            while int(writer.stdout.readline()) < 15:
                pass
            overlay = images / "snap.qcow2"
            blkfs("image", "create", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", str(overlay))
            mount.ctl("change", f"disk {overlay}")  # the new tree keeps x.qcow2's node
            assert writer.stdout.read().split()[-1] == str(CHUNKS - 1)
        finally:
            writer.kill()
    assert writer.returncode == 0
    with open(mount / "disk", "rb") as disk:
        lost = [i for i in range(CHUNKS) if disk.read(MiB) != chunk(i)]
    assert not lost, f"MiB {lost} lost"
    tree = mount.backends()["disk"]["tree"]
    assert tree["options"]["driver"] == "qcow2"
    assert tree["children"]["backing"]["read-only"], "the old top is a read-only backing now"
    mount.stop()
    qemu_img_check(base)
    qemu_img_check(overlay)


def test_dd_seek_without_notrunc_and_truncate_never_shrink_a_disk(
    mount_factory, images: Path
) -> None:
    image = images / "d.img"
    data = pattern_image(image, 64 * MiB, image_id=1)
    mount = mount_factory("--backend", f"disk0={image}")
    disk = mount / "disk0"
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={disk}", "bs=1M", "seek=10", "count=1", "status=none"],
        capture_output=True,
        text=True,
    )
    assert "failed to truncate" in dd.stderr  # dd says so, then writes in place
    assert os.stat(disk).st_size == 64 * MiB
    assert "conv=notrunc" in mount.last_error() and "shrink=on" in mount.last_error()
    assert errno_of(os.truncate, disk, 0) == errno.EPERM
    assert os.stat(disk).st_size == 64 * MiB
    after = image.read_bytes()
    assert after[: 10 * MiB] == data[: 10 * MiB] and after[11 * MiB :] == data[11 * MiB :]

    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={disk}",
            "bs=1M",
            "seek=10",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
        check=True,
    )
    os.truncate(disk, 96 * MiB)  # growing is fine
    assert os.stat(disk).st_size == 96 * MiB

    assert mount.ctl_errno("resize", "disk0 32M") == errno.EPERM
    assert os.stat(disk).st_size == 96 * MiB
    mount.ctl("resize", "disk0 32M shrink=on")
    assert os.stat(disk).st_size == 32 * MiB == image.stat().st_size
    mount.ctl("resize", "disk0 48M")
    assert os.stat(disk).st_size == 48 * MiB
    assert mount.ctl_errno("resize", "disk0 48M shrink=maybe") == errno.EINVAL
    assert mount.ctl_errno("resize", "disk0 lots") == errno.EINVAL


@needs_qemu
def test_qemu_img_convert_onto_a_backend_cannot_shrink_it(mount_factory, images: Path) -> None:
    image = images / "d.img"
    data = pattern_image(image, 16 * MiB, image_id=1)
    small = images / "small.qcow2"
    blkfs("image", "create", "-f", "qcow2", str(small), "1M")
    mount = mount_factory("--backend", f"disk0={image}")
    result = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(small), str(mount / "disk0")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert os.stat(mount / "disk0").st_size == 16 * MiB and image.read_bytes() == data


def test_eject_and_change_refuse_while_a_writer_holds_the_disk(mount_factory, images: Path) -> None:
    a, b = images / "a.img", images / "b.img"
    data = pattern_image(a, 4 * MiB, image_id=1)
    pattern_image(b, 4 * MiB, image_id=2)
    mount = mount_factory("--backend", f"disk={a}")
    with open(mount / "disk", "r+b", buffering=0) as writer:
        writer.write(b"written")
        assert mount.ctl_errno("eject", "disk") == errno.EBUSY
        assert "1 writer" in mount.last_error() and "losetup -j" in mount.last_error()
        assert mount.ctl_errno("change", f"disk {b}") == errno.EBUSY
        assert mount.ctl_errno("eject", "disk force=of") == errno.EINVAL
        assert mount.backends()["disk"]["writers"] == 1
        with open(mount / "disk", "rb") as reader:  # readers never block a change
            assert reader.read(7) == b"written"
        writer.seek(0)
        assert writer.read(7) == b"written"  # the medium is untouched
    assert a.read_bytes()[:7] == b"written" and a.read_bytes()[7:] == data[7:]
    with open(mount / "disk", "r+b", buffering=0) as writer:  # a filter in and out: allowed
        mount.ctl(
            "change",
            f"disk driver=throttle,limits.iops-total=100000,"
            f"file.driver=raw,file.file.driver=file,file.file.filename={a}",
        )
        assert mount.backends()["disk"]["tree"]["driver"] == "throttle"
        writer.write(b"WRITTEN")
        mount.ctl("change", f"disk {a}")
        assert mount.backends()["disk"]["tree"]["driver"] == "raw"
        writer.seek(0)
        assert writer.read(7) == b"WRITTEN"
    with open(mount / "disk", "rb") as reader:
        mount.ctl("change", f"disk {b}")  # a CD swap under a reader
        assert reader.read(16) == b.read_bytes()[:16]
    with open(mount / "disk", "r+b", buffering=0):
        mount.ctl("eject", "disk force=on")
    assert mount.backends()["disk"]["medium"] is False


def test_requests_in_flight_across_a_change_finish_on_the_old_medium(
    mount_factory, images: Path
) -> None:
    """The change drains the old medium first: reads held in blkdebug's delay return the
    old data and a held write lands in the old image, none of them in the new one (FUSE
    sends one direct write of a file at a time, so one write is in flight)."""
    a, b = images / "a.img", images / "b.img"
    old = pattern_image(a, 4 * MiB, image_id=1)
    new = pattern_image(b, 4 * MiB, image_id=2)
    mount = mount_factory(
        "--backend",
        f"d=driver=blkdebug,node-name=dbg,delay.read=3s,"
        f"delay.write=3s,image.driver=file,image.filename={a}",
    )
    reads, writes = range(4), range(8, 9)  # 4 KiB blocks; the kernel sends one write
    results: dict[int, bytes | int | OSError] = {}

    def read(fd: int, block: int) -> None:
        try:
            results[block] = os.pread(fd, 4096, block * 4096)
        except OSError as exc:
            results[block] = exc

    def write(fd: int, block: int) -> None:
        try:
            results[block] = os.pwrite(fd, bytes([65 + block]) * 4096, block * 4096)
        except OSError as exc:
            results[block] = exc

    reader = os.open(mount / "d", os.O_RDONLY)
    writer = os.open(mount / "d", os.O_RDWR)
    try:
        threads = [threading.Thread(target=read, args=(reader, n)) for n in reads]
        threads += [threading.Thread(target=write, args=(writer, n)) for n in writes]
        for thread in threads:
            thread.start()
        wait_until(
            lambda: node(mount.backends()["d"]["tree"], "dbg")["info"]["delayed"] == len(threads),
            "every request to be in flight",
        )
        mount.ctl("change", f"d {b},force=on")
        for thread in threads:
            thread.join()
        assert mount.backends()["d"]["tree"]["driver"] == "raw"
        for n in reads:
            assert results[n] == old[n * 4096 : (n + 1) * 4096], n
        for n in writes:
            assert results[n] == 4096, n
        assert os.pread(reader, 4 * MiB, 0) == new  # nothing reached the new medium
    finally:
        os.close(reader)
        os.close(writer)
    on_disk = a.read_bytes()
    for n in writes:
        assert on_disk[n * 4096 : (n + 1) * 4096] == bytes([65 + n]) * 4096, n
    assert b.read_bytes() == new


@needs_loop
@pytest.mark.loop
def test_a_mounted_filesystem_on_a_loop_device_keeps_its_medium(
    mount_factory, images: Path, tmp_path: Path
) -> None:
    image, other = images / "vol.img", images / "other.img"
    for path in (image, other):
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
    mount = mount_factory("--backend", f"vol={image}")
    with loop_device(mount / "vol") as device:
        run("mkfs.ext4", "-q", device)
        with mounted_fs(device, tmp_path / "fs") as fs:
            (fs / "payload").write_bytes(os.urandom(MiB))
            for verb, text in (
                ("eject", "vol"),
                ("change", f"vol {other}"),
                ("change", f"vol driver=raw,file.driver=file,file.filename={other}"),
            ):
                assert mount.ctl_errno(verb, text) == errno.EBUSY, (verb, text)
            os.sync()
        assert errno_of(os.unlink, mount / "vol") == errno.EBUSY  # a writer holds it
        mount.ctl("delete", "vol force=on")  # the name goes; the loop device still works
        assert "vol" not in os.listdir(mount.path)
        deleted = [b for b in mount.status()["backends"] if b["name"] == "vol"]
        assert deleted and deleted[0]["deleted"] and deleted[0]["open"] == 1
        umount = blkfs("umount", str(mount.path), check=False)
        assert umount.returncode == 1 and "vol (deleted, 1 open" in umount.stderr
        assert f"loop device {device}" in umount.stderr  # lsof would not show it
        assert mounted(mount.path)
        with mounted_fs(device, tmp_path / "fs") as fs:
            assert len((fs / "payload").read_bytes()) == MiB
    wait_until(
        lambda: not [b for b in mount.status()["backends"] if b["name"] == "vol"],
        "the loop device to let go",
    )
    mount.stop()
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)


def test_umount_refuses_while_a_deleted_backend_is_open(mount: Mount, images: Path) -> None:
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    mount.ctl("create", f"d {image}")
    with open(mount / "d", "r+b", buffering=0) as held:
        mount.ctl("delete", "d force=on")
        result = blkfs("umount", str(mount.path), check=False)
        assert result.returncode == 1 and "d (deleted, 1 open)" in result.stderr
        assert mounted(mount.path)
        held.write(b"still served")
    result = blkfs("umount", str(mount.path), check=False)
    assert result.returncode == 0 and image.read_bytes()[:12] == b"still served"


def test_a_failed_host_flush_stays_failed_until_the_medium_is_changed(
    mount_factory, tmp_path: Path
) -> None:
    """The host's fdatasync fails once (nbdkit under nbdfuse); Linux would let the next one
    succeed although the data may be gone, so every later flush fails too."""
    with flaky_disk(tmp_path) as (host, trigger):
        spec = f"driver=raw,file.driver=file,file.filename={host}"
        mount = mount_factory("--backend", f"d={spec}")
        disk = os.open(mount / "d", os.O_RDWR)
        os.write(disk, b"maybe lost")
        trigger.touch()
        assert errno_of(os.fsync, disk) == errno.EIO  # the host's failure
        trigger.unlink()
        assert errno_of(os.fsync, disk) == errno.EIO  # and not forgotten
        assert errno_of(os.close, disk) == errno.EIO  # a written file flushes on close
        umount = blkfs("umount", str(mount.path), check=False)
        assert umount.returncode == 1 and "cannot flush d" in umount.stderr
        assert mount.ctl_errno("change", f"d {spec}") == errno.EIO  # its flush fails too
        mount.ctl("change", f"d {spec},force=on")  # a new node opens the image afresh
        with open(mount / "d", "r+b", buffering=0) as again:
            again.write(b"written again")
            os.fsync(again.fileno())
        mount.stop()
        assert not mounted(mount.path)
