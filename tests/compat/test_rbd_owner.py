"""Ownership of an RBD image across clients: one writer holds the exclusive lock; a second
writer (another blkfs daemon, QEMU) is refused with EBUSY; readers and snapshots open beside
it, read-only."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.ceph import POOL, Cluster, needs_ceph
from tests.compat.peers import MiB
from tests.conftest import needs_fuse
from tests.helpers import Mount, errno_of

pytestmark = [needs_ceph, pytest.mark.qemu]
SIZE = 4 * MiB


async def test_a_second_writer_is_refused_and_readers_open_beside_the_first(
    ceph: Cluster,
) -> None:
    name = ceph.image(SIZE)
    first, second = BlockLayer(), BlockLayer()
    try:
        writer = await first.create("w", ceph.spec(name))
        await writer.write(0, b"first" * 100)
        await writer.flush()
        with pytest.raises(BlockError) as refused:
            await second.create("w2", ceph.spec(name))
        assert refused.value.errno == errno.EBUSY
        assert "another client" in str(refused.value), refused.value
        assert "w2" not in second  # a failed create changes nothing
        reader = await second.create("r", f"{ceph.spec(name)},read-only=on")
        assert await reader.read(0, 500) == b"first" * 100
        await writer.write(0, b"again" * 100)  # the writer still writes
        await writer.flush()
    finally:
        await second.close()
        await first.close()


async def test_qemu_cannot_write_an_image_blkfs_writes(ceph: Cluster) -> None:
    name = ceph.image(SIZE)
    layer = BlockLayer()
    try:
        writer = await layer.create("w", ceph.spec(name))
        await writer.write(0, b"blkfs" * 100)
        await writer.flush()
        result = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", ceph.spec(name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode or "error" in (result.stdout + result.stderr).lower()
        assert await writer.read(0, 500) == b"blkfs" * 100
        await writer.write(4096, b"still" * 100)
        await writer.flush()
    finally:
        await layer.close()
    assert ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-")[:500] == b"blkfs" * 100


@pytest.mark.fuse
@needs_fuse
def test_two_daemons_one_writer(ceph: Cluster, mount_factory: Callable[..., Mount]) -> None:
    """Two blkfs daemons on one image: the second's writable backend is refused (EBUSY,
    the reason in .ctl/error), its read-only one reads what the first wrote and fsynced."""
    name = ceph.image(SIZE)
    first = mount_factory("--backend", f"d={ceph.spec(name)}")
    second = mount_factory()
    data = b"from the first daemon".ljust(4096, b".")
    with open(first / "d", "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert second.ctl_errno("create", f"d {ceph.spec(name)}") == errno.EBUSY
    assert "open for writing by another client" in second.last_error()
    assert "d" not in second.backends()
    second.ctl("create", f"r {ceph.spec(name)},read-only=on")
    assert (second / "r").read_bytes()[:4096] == data
    assert errno_of(lambda: (second / "r").write_bytes(b"x")) == errno.EROFS


async def test_reopen_read_only_lets_the_lock_go_and_a_refused_switch_back_changes_nothing(
    ceph: Cluster,
) -> None:
    name = ceph.image(SIZE)
    first, second = BlockLayer(), BlockLayer()
    try:
        backend = await first.create("w", f"{ceph.spec(name)},node-name=img")
        await backend.write(0, b"one" * 100)
        await first.reopen("img", "read-only=on")
        other = await second.create("w", ceph.spec(name))  # the lock is free now
        await other.write(0, b"two" * 100)
        await other.flush()
        with pytest.raises(BlockError) as refused:
            await first.reopen("img", "read-only=off")
        assert refused.value.errno == errno.EBUSY
        assert backend.read_only
        assert await backend.read(0, 300) == b"two" * 100  # still reads, read-only
        await second.close()
        await first.reopen("img", "read-only=off")
        await backend.write(0, b"three" * 100)
        await backend.flush()
    finally:
        await second.close()
        await first.close()
    assert ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-")[:500] == b"three" * 100
