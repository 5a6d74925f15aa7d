"""cache.direct=on on a host filesystem that answers O_DIRECT reads short in the middle of a
file (network filesystems may): tests/short_reads.py serves an image through FUSE with reads
of at most 4 KiB, and the file driver must read on, not take the first short read as the end
of the file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkfs.layer import BlockLayer
from tests.conftest import needs_fuse
from tests.helpers import force_unmount, mounted, wait_until

pytestmark = [needs_fuse, pytest.mark.fuse]
MiB = 1 << 20


@pytest.fixture
def short_reads(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """MNT/disk, a 2 MiB and 1000 bytes image (its end not aligned) read 4 KiB at a time."""
    image, mountpoint = tmp_path / "img.raw", tmp_path / "mnt"
    data = os.urandom(2 * MiB + 1000)
    image.write_bytes(data)
    mountpoint.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.short_reads", str(mountpoint), str(image)]
    )
    try:
        wait_until(lambda: mounted(mountpoint) or server.poll() is not None, "the FUSE server")
        assert server.poll() is None
        yield mountpoint / "disk", data
    finally:
        force_unmount(mountpoint)
        server.wait(timeout=30)


def first_difference(got: bytes, expected: bytes) -> int | None:
    """Where two byte strings part (None: equal), cheaper to report than a diff of MiBs."""
    if got == expected:
        return None
    return next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), len(got)
    )


async def test_a_short_direct_read_mid_file_is_read_on(short_reads) -> None:
    disk, data = short_reads
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=raw,file.driver=file,file.filename={disk},file.cache.direct=on,read-only=on",
        )
        assert backend.length() == len(data)
        assert first_difference(await backend.read(0, len(data)), data) is None
        middle = await backend.read(MiB - 100, 300000)
        assert first_difference(middle, data[MiB - 100 : MiB - 100 + 300000]) is None
        assert await backend.read(len(data) - 700, 700) == data[-700:]  # the unaligned end
    finally:
        await layer.close()
