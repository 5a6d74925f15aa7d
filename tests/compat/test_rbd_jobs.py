"""RBD images in trees and jobs: a local qcow2 overlay over a base in the cluster (QEMU's
thin clone per container), a live mirror of a local volume into the cluster that pivots to
it, and ``blkfs image convert`` into and out of the cluster; a mount confined to image
directories reaches no cluster, not even through an image's header."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.ceph import POOL, Cluster, needs_ceph
from tests.compat.peers import MiB, check, qemu, to_raw
from tests.conftest import needs_fuse
from tests.helpers import Mount, blkfs

pytestmark = [needs_ceph, pytest.mark.qemu]
SIZE = 8 * MiB


def base_image(ceph: Cluster) -> tuple[str, bytes]:
    """An image in the cluster filled with a pattern by ``qemu-io``; its name and contents."""
    name = ceph.image(SIZE)
    qemu("qemu-io", "-f", "raw", "-c", f"write -P 0x5b 0 {SIZE}", ceph.spec(name))
    return name, b"\x5b" * SIZE


async def test_a_local_qcow2_overlay_over_an_rbd_base(ceph: Cluster, tmp_path: Path) -> None:
    name, base = base_image(ceph)
    overlay = tmp_path / "clone.qcow2"
    blkfs("image", "create", "-f", "qcow2", "-b", ceph.spec(name), "-F", "raw", str(overlay))
    model = bytearray(base)
    layer = BlockLayer()
    try:
        backend = await layer.create("vol", str(overlay))
        assert backend.length() == SIZE
        assert await backend.read(0, SIZE) == base
        await backend.write(MiB + 7, b"local" * 3000)
        model[MiB + 7 : MiB + 7 + 15000] = b"local" * 3000
        await backend.flush()
        assert await backend.read(0, SIZE) == model
    finally:
        await layer.close()
    check(overlay)
    assert to_raw(overlay) == model  # QEMU follows the rbd: name in the header too
    assert ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-") == base  # base untouched


async def test_a_confined_mount_reaches_no_cluster(ceph: Cluster, tmp_path: Path) -> None:
    name, _ = base_image(ceph)
    overlay = tmp_path / "clone.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", ceph.spec(name), "-F", "raw", overlay)
    layer = BlockLayer(image_dirs=[str(tmp_path)])
    try:
        for medium in (str(overlay), ceph.spec(name)):
            with pytest.raises(BlockError) as refused:
                await layer.create("vol", medium)
            assert refused.value.errno == errno.EACCES, refused.value
            assert "not allowed with image directories" in str(refused.value)
            assert "vol" not in layer
    finally:
        await layer.close()


def test_image_convert_into_and_out_of_the_cluster(ceph: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, str(SIZE))
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 3M", source)
    name = ceph.image()
    blkfs("image", "convert", str(source), ceph.spec(name))
    expected = to_raw(source)
    assert ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-") == expected
    back = tmp_path / "back.qcow2"
    blkfs("image", "convert", "-O", "qcow2", ceph.spec(name), str(back))
    check(back)
    assert to_raw(back) == expected


@pytest.mark.fuse
@needs_fuse
def test_a_live_volume_mirrored_into_the_cluster_then_attached_elsewhere(
    ceph: Cluster, tmp_path: Path, mount_factory: Callable[..., Mount]
) -> None:
    """The README's walk-through in short: a local thin volume written while it is mirrored
    into the cluster; after the pivot, writes go to the cluster; a second daemon attaches it
    once the first lets go."""
    local = tmp_path / "vol.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", local, str(SIZE))
    mount = mount_factory("--backend", f"vol={local}")
    first = os.urandom(SIZE)
    with open(mount / "vol", "r+b") as f:
        f.write(first)
        f.flush()
        os.fsync(f.fileno())
    name = ceph.image()
    blkfs("image", "create", ceph.spec(name), str(SIZE))
    blkfs("mirror", str(mount.path), "vol", ceph.spec(name))
    tree = mount.backends()["vol"]["tree"]
    assert tree["driver"] == "rbd", tree
    with open(mount / "vol", "r+b") as f:
        f.seek(MiB)
        f.write(b"after the pivot" * 100)
        f.flush()
        os.fsync(f.fileno())
    expected = bytearray(first)
    expected[MiB : MiB + 1500] = b"after the pivot" * 100
    assert to_raw(local) == first  # the local image is left as it was at the pivot
    second = mount_factory()
    assert second.ctl_errno("create", f"vol {ceph.spec(name)}") == errno.EBUSY
    mount.stop()
    second.ctl("create", f"vol {ceph.spec(name)}")
    assert (second / "vol").read_bytes() == expected
