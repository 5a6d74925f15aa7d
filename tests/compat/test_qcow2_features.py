"""The qcow2 feature bits of images QEMU made: blkfs supports each, or handles it as the
spec says. Extended L2 entries and both compression types are read and written by the
matrices of test_qcow2_read.py and test_qcow2_write.py; here are the rest:

* autoclear bit 0 (persistent dirty bitmaps consistent): blkfs maintains the bitmaps
  (tests/compat/test_qcow2_bitmaps.py), so the bit stays; each bitmap is in use on disk
  before blkfs's first change of the image (readers must not trust bitmaps that may miss
  writes); a read-only open, or a writable one that changes nothing, leaves their data alone.
* external data file (incompatible bit 2, with or without autoclear bit 1): refused.
* dirty (incompatible bit 0, lazy refcounts) and corrupt (incompatible bit 1): open
  read-only only, as QEMU without repair.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from blkfs_drivers.qcow2.ondisk import EXT_BITMAPS, BitmapDirEntry, BitmapsExtension, Header

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, create, qemu, qemu_io, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount
from tests.logreplay import parse

pytestmark = [needs_qemu]

AUTOCLEAR_AT = 88
"""Byte offset of autoclear_features in a version 3 header (spec: "Header")."""


def info(image: Path) -> tuple[dict[str, object], str]:
    """``qemu-img info`` of the image as JSON, and what it warned on stderr."""
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout), result.stderr


def bitmaps(image: Path) -> list[dict[str, object]]:
    """The persistent bitmaps qemu-img reports as usable (none once they are stale)."""
    specific = info(image)[0]["format-specific"]
    assert isinstance(specific, dict)
    found = specific["data"].get("bitmaps", [])
    assert isinstance(found, list)
    return found


def check_clean(image: Path) -> None:
    result = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def with_bitmap(directory: Path) -> Path:
    """A 64 MiB image with bitmap b0 that recorded a QEMU write (so it has a data cluster)."""
    image = create(directory, "bm.qcow2", size=64 * MiB)
    qemu("qemu-img", "bitmap", "--add", image, "b0")
    qemu_io(image, "qcow2", "write -P 0x11 0 1M")
    assert [b["name"] for b in bitmaps(image)] == ["b0"]
    return image


@needs_fuse
def test_a_write_through_the_mount_keeps_the_bitmaps(
    mount_factory: Callable[..., Mount], images: Path
) -> None:
    image = with_bitmap(images)
    for args in ([f"d={image},read-only=on"], [f"d={image}"]):  # read only; writable, unused
        mount = mount_factory("--backend", *args)
        assert (mount / "d").read_bytes()[:MiB] == b"\x11" * MiB
        mount.stop()
        assert [b["name"] for b in bitmaps(image)] == ["b0"], args
        check_clean(image)

    mount = mount_factory("--backend", f"d={image}")
    subprocess.run(
        [
            "dd",
            "if=/dev/urandom",
            f"of={mount / 'd'}",
            "bs=64k",
            "count=16",
            "seek=128",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )
    written = (mount / "d").read_bytes()[8 * MiB : 9 * MiB]
    mount.stop()

    assert [(b["name"], b["flags"]) for b in bitmaps(image)] == [("b0", ["auto"])]
    _, warned = info(image)
    assert "inconsistent" not in warned
    check_clean(image)  # the old bitmap clusters were freed, not leaked
    data = to_raw(image)
    assert data[:MiB] == b"\x11" * MiB and data[8 * MiB : 9 * MiB] == written


def directory_of(image: Path) -> int:
    """Where the image's bitmap directory lies."""
    with open(image, "rb") as f:
        header = Header.unpack(f.read(65536))
    (extension,) = (e for e in header.extensions if e.type == EXT_BITMAPS)
    return BitmapsExtension.unpack(extension.data).bitmap_directory_offset


async def test_the_bitmaps_are_in_use_on_disk_before_any_other_write(images: Path) -> None:
    """In the log of every write blkfs made: the first rewrites the bitmap directory with
    the in-use flag, and each later one comes after a flush that made it durable, so no
    power cut leaves data the bitmaps missed beside bitmaps that claim to be consistent."""
    image = with_bitmap(images)
    directory = directory_of(image)
    log_path = images / "writes.log"
    log_path.write_bytes(b"")
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=qcow2,file.driver=blklogwrites,file.file.driver=file,"
            f"file.file.filename={image},file.log.driver=file,"
            f"file.log.filename={log_path}",
        )
        await backend.write(5 * MiB, b"\x22" * 4096)
        await backend.discard(0, MiB)
    finally:
        await layer.close()
    log = parse(log_path.read_bytes())
    in_use_at = None
    for index, entry in enumerate(log.entries):
        if not entry.changes_data:
            continue
        offset, _length = log.extent(entry)
        if in_use_at is None:
            assert offset == directory, "the first write must mark the bitmaps in use"
            flags = BitmapDirEntry.unpack(entry.data).flags
            assert flags & 1, "in use"
            in_use_at = index
        assert index == in_use_at or log.durable_upto(index) > in_use_at, (
            f"log entry {index} ({offset:#x}) may reach the disk before the in-use flag"
        )
    assert in_use_at is not None
    assert [(b["name"], b["flags"]) for b in bitmaps(image)] == [("b0", ["auto"])]
    check_clean(image)


async def test_bitmaps_pointing_at_live_metadata_are_stored_anew_but_nothing_is_freed(
    images: Path,
) -> None:
    """A bitmap table entry naming the L1 table (a hostile or broken image): the bitmap is
    stored anew at close, but the old clusters are left leaked, never freed under the L1
    table."""
    image = with_bitmap(images)
    with open(image, "r+b") as f:
        header = Header.unpack(f.read(65536))
        (extension,) = (e for e in header.extensions if e.type == EXT_BITMAPS)
        directory = BitmapsExtension.unpack(extension.data).bitmap_directory_offset
        f.seek(directory)
        entry = BitmapDirEntry.unpack(f.read(BitmapDirEntry.STRUCT.size))
        f.seek(entry.bitmap_table_offset)
        f.write(struct.pack(">Q", header.l1_table_offset))
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"driver=qcow2,file.driver=file,file.filename={image}")
        await backend.write(4 * MiB, b"\x22" * 65536)
    finally:
        await layer.close()
    assert [b["name"] for b in bitmaps(image)] == ["b0"]
    report = json.loads(
        subprocess.run(
            ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
        ).stdout
    )
    assert report.get("corruptions", 0) == 0 and report["leaks"] >= 2
    data = to_raw(image)
    assert data[:MiB] == b"\x11" * MiB and data[4 * MiB : 4 * MiB + 65536] == b"\x22" * 65536


def _data_file(directory: Path, raw: bool) -> Path:
    return create(
        directory,
        "ext.qcow2",
        f"data_file={directory / 'ext.raw'}" + (",data_file_raw=on" if raw else ""),
    )


def _dirty(directory: Path) -> Path:
    """QEMU killed while writing an image with lazy refcounts: the dirty bit stays set."""
    image = create(directory, "dirty.qcow2", "lazy_refcounts=on")
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "sigraise 9", str(image)],
        capture_output=True,
    )
    assert result.returncode == -9
    assert info(image)[0]["dirty-flag"] is True
    return image


def _corrupt(directory: Path) -> Path:
    """QEMU marks an image corrupt when a write would land on its metadata: here the L1
    entry of the first L2 table points at the refcount table (as QEMU's iotest 060)."""
    image = create(directory, "corrupt.qcow2")
    qemu_io(image, "qcow2", "write -P 0x5a 0 64k")
    with open(image, "r+b") as f:
        l1, reftable = (
            struct.unpack(">Q", os.pread(f.fileno(), 8, 40))[0],
            struct.unpack(">Q", os.pread(f.fileno(), 8, 48))[0],
        )
        os.pwrite(f.fileno(), struct.pack(">Q", 1 << 63 | reftable), l1)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(image)], capture_output=True)
    specific = info(image)[0]["format-specific"]
    assert isinstance(specific, dict) and specific["data"]["corrupt"] is True
    return image


REFUSED: dict[str, tuple[Callable[[Path], Path], bool, int, str]] = {
    "external-data-file": (
        lambda d: _data_file(d, False),
        False,
        errno.ENOTSUP,
        "external data file",
    ),
    "external-data-file-raw": (
        lambda d: _data_file(d, True),
        False,
        errno.ENOTSUP,
        "external data file",
    ),
    "dirty": (_dirty, True, errno.EROFS, "not closed cleanly"),
    "corrupt": (_corrupt, True, errno.EROFS, "marked corrupt"),
}
"""Image maker, whether it opens read-only, the errno and words of a refused open."""


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_feature_bits_blkfs_does_not_write_are_refused_and_change_nothing(
    images: Path, case: str
) -> None:
    make, read_only_ok, code, words = REFUSED[case]
    image = make(images)
    before = image.read_bytes()
    layer = BlockLayer()
    try:
        with pytest.raises(BlockError) as refused:
            await layer.create("w", f"driver=qcow2,file.driver=file,file.filename={image}")
        assert refused.value.errno == code and words in refused.value.message
        assert "w" not in layer
        if read_only_ok:
            backend = await layer.create(
                "r", f"driver=qcow2,read-only=on,file.driver=file,file.filename={image}"
            )
            if case == "dirty":
                assert await backend.read(0, 65536) == b"\x5a" * 65536
        else:
            with pytest.raises(BlockError) as refused:
                await layer.create(
                    "r", f"driver=qcow2,read-only=on,file.driver=file,file.filename={image}"
                )
            assert refused.value.errno == code and words in refused.value.message
    finally:
        await layer.close()
    assert image.read_bytes() == before
