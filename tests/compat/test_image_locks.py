"""Image locks as QEMU takes them: the same lock bytes on every image file as a running
qemu-storage-daemon holds for the same tree, so that QEMU's tools and blkfs see each other's
use of an image; and inside blkfs, no writer of an image some node reads as backing."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, create
from tests.conftest import needs_qemu
from tests.helpers import Mount, blkfs, wait_until
from tests.locks import lock_bytes

pytestmark = [needs_qemu]

READ, WRITE, RESIZE = "consistent read", "write", "resize"


@contextmanager
def storage_daemon(tmp_path: Path, *blockdevs: str) -> Iterator[None]:
    """qemu-storage-daemon holding ``blockdevs`` open until the body ends."""
    pidfile = tmp_path / "qsd.pid"
    args = ["qemu-storage-daemon", "--pidfile", str(pidfile)]
    for blockdev in blockdevs:
        args += ["--blockdev", blockdev]
    log = tmp_path / "qsd.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: pidfile.exists() or daemon.poll() is not None, "qemu-storage-daemon")
        assert daemon.poll() is None, log.read_text()
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


async def blkfs_locks(
    images: list[Path], options: str, read_only: bool = False
) -> list[tuple[set[str], set[str]]]:
    layer = BlockLayer()
    try:
        await layer.create("d", options, read_only=read_only)
        return [lock_bytes(image) for image in images]
    finally:
        await layer.close()


def qsd_locks(
    tmp_path: Path, images: list[Path], *blockdevs: str
) -> list[tuple[set[str], set[str]]]:
    with storage_daemon(tmp_path, *blockdevs):
        return [lock_bytes(image) for image in images]


async def test_a_writable_qcow2_chain_locks_as_qemu_does(tmp_path: Path) -> None:
    base = create(tmp_path, "base.qcow2", size=4 * MiB)
    top = create(tmp_path, "top.qcow2", size=4 * MiB, backing=str(base))
    qsd = qsd_locks(
        tmp_path, [top, base], f"driver=qcow2,node-name=q,file.driver=file,file.filename={top}"
    )
    ours = await blkfs_locks([top, base], str(top))
    assert ours == qsd == [({READ, WRITE, RESIZE}, {WRITE, RESIZE}), ({READ}, {WRITE, RESIZE})]


async def test_a_read_only_qcow2_locks_as_qemu_does(tmp_path: Path) -> None:
    image = create(tmp_path, "a.qcow2", size=4 * MiB)
    qsd = qsd_locks(
        tmp_path,
        [image],
        f"driver=qcow2,node-name=q,read-only=on,file.driver=file,file.filename={image}",
    )
    ours = await blkfs_locks([image], str(image), read_only=True)
    assert ours == qsd == [({READ}, {WRITE, RESIZE})]


async def test_a_read_only_raw_image_locks_as_qemu_does(tmp_path: Path) -> None:
    image = tmp_path / "cd.iso"
    image.write_bytes(bytes(MiB))
    qsd = qsd_locks(
        tmp_path,
        [image],
        f"driver=raw,node-name=r,read-only=on,file.driver=file,file.filename={image}",
    )
    ours = await blkfs_locks([image], str(image), read_only=True)
    # qsd with no user takes nothing; blkfs's backend reads it, as a FUSE export would
    assert qsd == [(set(), set())] and ours == [({READ}, set())]


async def test_a_writable_raw_disk_has_one_writer_unlike_a_qsd_export(tmp_path: Path) -> None:
    """qemu-storage-daemon's FUSE export lets others write a raw image it writes; blkfs's
    backend is a disk with one writer, as a VM's disk is in QEMU, so qemu-io cannot."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    ours = await blkfs_locks([image], str(image))
    assert ours == [({READ, WRITE, RESIZE}, {WRITE})]
    layer = BlockLayer()
    try:
        await layer.create("d", str(image))
        qemu_io = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)],
            capture_output=True,
            text=True,
        )
        assert qemu_io.returncode != 0 and 'Failed to get "write" lock' in qemu_io.stderr
    finally:
        await layer.close()


async def test_a_base_in_use_as_backing_cannot_be_written(tmp_path: Path) -> None:
    base = create(tmp_path, "base.qcow2", size=4 * MiB)
    clones = [
        create(tmp_path, f"clone{i}.qcow2", size=4 * MiB, backing=str(base)) for i in range(2)
    ]
    for locking in ("auto", "off"):  # the graph refuses it even where nothing locks
        layer = BlockLayer()
        try:
            for i, clone in enumerate(clones):
                await layer.create(
                    f"c{i}",
                    f"driver=qcow2,file.driver=file,file.locking={locking},file.filename={clone}",
                )
            with pytest.raises(BlockError) as err:
                await layer.create(
                    "w",
                    f"driver=qcow2,file.driver=file,file.locking={locking},file.filename={base}",
                )
            assert err.value.errno == errno.EBUSY and "base.qcow2" in str(err.value)
            assert "w" not in layer
            if locking == "auto":
                qemu_io = subprocess.run(
                    ["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(base)],
                    capture_output=True,
                    text=True,
                )
                assert qemu_io.returncode != 0 and "lock" in qemu_io.stderr
                commit = subprocess.run(
                    ["qemu-img", "commit", str(clones[0])], capture_output=True, text=True
                )
                assert commit.returncode != 0 and "lock" in commit.stderr
        finally:
            await layer.close()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_image_info_on_an_image_written_elsewhere_answers_as_qemu_img_info(
    tmp_path: Path, mount_factory: Callable[..., Mount], fmt: str
) -> None:
    """A qcow2 image a blkfs mount or qemu-io writes: ``qemu-img info`` refuses
    it (its metadata may change underneath) and reads it with -U; a raw one it reads either
    way. ``blkfs image info`` answers the same, and takes no lock a writer would meet."""
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "4M"], check=True)
    holders = {
        "blkfs": lambda: _mounted(mount_factory, image),
        "qemu-io": lambda: _qemu_io_holding(image, fmt),
    }
    for holder, hold in holders.items():
        with hold():
            held = lock_bytes(image)
            assert WRITE in held[0], holder
            for force in ([], ["-U"], ["--force-share"]):
                qemu = subprocess.run(
                    ["qemu-img", "info", *force, str(image)], capture_output=True, text=True
                )
                ours = blkfs("image", "info", *force, str(image), check=False)
                assert (ours.returncode, fmt) == (qemu.returncode, fmt), (
                    holder,
                    force,
                    ours.stderr,
                )
                if qemu.returncode:
                    assert 'Failed to get shared "write" lock' in qemu.stderr
                    assert 'shared "write" lock' in ours.stderr and "-U" in ours.stderr
                    assert "Traceback" not in ours.stderr
                else:
                    assert f"file format: {fmt}" in ours.stdout
                assert lock_bytes(image) == held, (holder, force)


@contextmanager
def _mounted(mount_factory: Callable[..., Mount], image: Path) -> Iterator[None]:
    mount = mount_factory("--backend", f"d={image}")
    try:
        yield
    finally:
        mount.stop()


@contextmanager
def _qemu_io_holding(image: Path, fmt: str) -> Iterator[None]:
    """An interactive qemu-io with ``image`` open for writing until the body ends."""
    qemu_io = subprocess.Popen(
        ["qemu-io", "-f", fmt, str(image)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: WRITE in lock_bytes(image)[0] or qemu_io.poll() is not None,
            "qemu-io to open the image",
        )
        assert qemu_io.poll() is None
        yield
    finally:
        assert qemu_io.stdin is not None
        qemu_io.stdin.close()  # qemu-io quits at the end of its input
        qemu_io.wait(timeout=30)


def test_image_info_reads_the_base_of_a_mounted_overlay_as_qemu_img_info(
    tmp_path: Path, mount_factory: Callable[..., Mount]
) -> None:
    """An image others only read (the backing file of a mounted overlay) needs no -U."""
    base = create(tmp_path, "base.qcow2", size=4 * MiB)
    top = create(tmp_path, "top.qcow2", size=4 * MiB, backing=str(base))
    mount_factory("--backend", f"d={top}")
    for image, readable in ((base, True), (top, False)):
        qemu = subprocess.run(["qemu-img", "info", str(image)], capture_output=True)
        ours = blkfs("image", "info", "--json", str(image), check=False)
        assert (qemu.returncode == 0) == readable == (ours.returncode == 0), image
    assert json.loads(blkfs("image", "info", "--json", str(top), "-U").stdout)["backing-chain"][0][
        "filename"
    ] == str(base)
