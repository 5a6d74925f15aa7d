"""Persistent dirty bitmaps in qcow2 against QEMU's tools: a bitmap qemu-img added is
maintained by blkfs (qemu-nbd -B and nbdinfo then list exactly what blkfs wrote), a bitmap
blkfs added is read by qemu-img and qemu-nbd, and one open at a crash is never trusted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.compat.peers import MiB, create, qemu, qemu_io
from tests.conftest import needs_fuse, needs_qemu
from tests.fuse.test_bitmaps import bitmaps_of
from tests.helpers import Mount, blkfs, wait_until
from tests.nbdpeers import needs_nbd_tools, qemu_nbd

pytestmark = [needs_qemu, needs_nbd_tools, needs_fuse, pytest.mark.fuse]
K64 = 64 << 10


def stored(image: Path) -> dict[str, dict[str, Any]]:
    """The bitmaps as ``qemu-img info`` lists them (-U: blkfs may hold the image)."""
    out = qemu("qemu-img", "info", "-U", "--output=json", image)
    found = json.loads(out)["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b for b in found}


def dirty_map(image: Path, name: str, sock: Path) -> list[tuple[int, int]]:
    """The dirty runs of bitmap ``name`` as qemu-nbd -B serves them to nbdinfo."""
    with qemu_nbd(image, "qcow2", sock, "-r", "-B", name) as server:
        out = subprocess.run(
            ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", server.uri],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def dd(path: Path, offset: int, length: int) -> None:
    subprocess.run(
        [
            "dd",
            "if=/dev/urandom",
            f"of={path}",
            "bs=64k",
            f"count={length // K64}",
            f"seek={offset // K64}",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )


def check_clean(image: Path) -> None:
    result = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bitmap_qemu_img_added_records_what_blkfs_writes(
    mount_factory: Callable[..., Mount], images: Path, tmp_path: Path
) -> None:
    """The issue's defect: before, the bitmap stayed "consistent" and reported the disk
    clean after blkfs wrote MiB 8-12, so an incremental backup missed those writes."""
    image = create(images, "a.qcow2", size=64 * MiB)
    qemu("qemu-img", "bitmap", "--add", image, "b0")
    qemu_io(image, "qcow2", "write -P 0x11 0 64k")  # QEMU's own write, recorded by QEMU
    mount = mount_factory("--backend", f"d={image}")
    assert stored(image)["b0"]["flags"] == ["in-use", "auto"]  # while open writable
    dd(mount / "d", 8 * MiB, 4 * MiB)
    mount.stop()
    assert stored(image)["b0"]["flags"] == ["auto"]
    assert dirty_map(image, "b0", tmp_path / "q.sock") == [(0, K64), (8 * MiB, 4 * MiB)]
    check_clean(image)


def test_a_bitmap_blkfs_added_is_read_by_qemu(
    mount_factory: Callable[..., Mount], images: Path, tmp_path: Path
) -> None:
    image = create(images, "a.qcow2", size=64 * MiB)
    mount = mount_factory(
        "--backend", f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}"
    )
    mount.ctl("bitmap-add", "img name=inc granularity=4K persistent=on")
    mount.ctl("bitmap-add", "img name=off persistent=on disabled=on")
    mount.ctl("bitmap-add", "img name=transient")
    with open(mount / "d", "r+b") as file:
        file.seek(20 * MiB + 4096)
        file.write(b"x" * 8192)
    mount.stop()
    found = stored(image)
    assert sorted(found) == ["inc", "off"]
    assert (found["inc"]["flags"], found["inc"]["granularity"]) == (["auto"], 4096)
    assert (found["off"]["flags"], found["off"]["granularity"]) == ([], K64)
    assert dirty_map(image, "inc", tmp_path / "q.sock") == [(20 * MiB + 4096, 8192)]
    assert dirty_map(image, "off", tmp_path / "q.sock") == []
    check_clean(image)

    mount = mount_factory(  # and blkfs reads back what it stored, then QEMU's changes
        "--backend", f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}"
    )
    found = bitmaps_of(mount)
    assert (found["inc"]["count"], found["inc"]["recording"]) == (8192, True)
    assert (found["off"]["count"], found["off"]["recording"]) == (0, False)
    mount.ctl("bitmap-remove", "img name=off")
    mount.stop()
    qemu("qemu-img", "bitmap", "--disable", image, "inc")
    assert sorted(stored(image)) == ["inc"]
    mount = mount_factory(
        "--backend", f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}"
    )
    assert bitmaps_of(mount)["inc"]["recording"] is False
    mount.stop()
    check_clean(image)


def test_a_bitmap_open_at_a_crash_is_inconsistent(
    mount_factory: Callable[..., Mount], images: Path
) -> None:
    image = create(images, "a.qcow2", size=64 * MiB)
    qemu("qemu-img", "bitmap", "--add", image, "b0")
    options = f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}"
    mount = mount_factory("--backend", options)
    dd(mount / "d", 0, MiB)
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(lambda: not mount.alive(), "the daemon to die")
    mount.stop()
    assert stored(image)["b0"]["flags"] == ["in-use", "auto"]  # QEMU: inconsistent too

    mount = mount_factory("--backend", options)
    found = bitmaps_of(mount)["b0"]
    assert (found["inconsistent"], found["recording"]) == (True, False)
    for verb in ("bitmap-clear", "bitmap-enable"):
        assert mount.ctl_errno(verb, "img name=b0") == errno.EINVAL
        assert "inconsistent" in mount.last_error()
    mount.ctl("bitmap-add", "img name=fresh persistent=on")
    mount.stop()  # stored back as it was: still in use
    assert stored(image)["b0"]["flags"] == ["in-use", "auto"]
    assert stored(image)["fresh"]["flags"] == ["auto"]

    mount = mount_factory("--backend", options)
    mount.ctl("bitmap-remove", "img name=b0")  # gone from the image at once, as in QEMU
    assert {n: b["flags"] for n, b in stored(image).items()} == {"fresh": ["in-use", "auto"]}
    mount.stop()
    assert {n: b["flags"] for n, b in stored(image).items()} == {"fresh": ["auto"]}
    check_clean(image)  # its clusters were freed


def test_a_read_only_open_leaves_the_bitmaps_as_they_are(
    mount_factory: Callable[..., Mount], images: Path
) -> None:
    image = create(images, "a.qcow2", size=64 * MiB)
    qemu("qemu-img", "bitmap", "--add", image, "b0")
    before = image.read_bytes()
    mount = mount_factory(
        "--backend",
        f"d=driver=qcow2,node-name=img,read-only=on,file.driver=file,file.filename={image}",
    )
    assert bitmaps_of(mount)["b0"]["persistent"] is True
    assert mount.ctl_errno("bitmap-clear", "img name=b0") == errno.EROFS
    assert mount.ctl_errno("bitmap-add", "img name=p persistent=on") == errno.EROFS
    mount.stop()
    assert image.read_bytes() == before


def test_blkfs_image_bitmap_verbs_agree_with_qemu_img(images: Path) -> None:
    image = create(images, "a.qcow2", size=16 * MiB)
    blkfs("image", "bitmap", "--add", "-g", "4K", str(image), "x")
    blkfs("image", "bitmap", "--add", str(image), "y")
    qemu_io(image, "qcow2", "write 1M 4k")
    blkfs("image", "bitmap", "--disable", "--merge", "y", str(image), "x")
    found = stored(image)
    assert (found["x"]["flags"], found["x"]["granularity"]) == ([], 4096)
    assert found["y"]["flags"] == ["auto"]
    failed = blkfs("image", "bitmap", "--remove", str(image), "nosuch", check=False)
    assert failed.returncode == 1 and "no dirty bitmap named 'nosuch'" in failed.stderr
    blkfs("image", "bitmap", "--remove", str(image), "y")
    assert sorted(stored(image)) == ["x"]
    check_clean(image)
