"""A backend file as a loop device: mkfs, mount, and the filesystem survives a remount."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount

pytestmark = [
    needs_fuse, pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None
                       or shutil.which("mkfs.ext4") is None,
                       reason="needs root, losetup and mkfs.ext4"),
]


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def attach(path: Path) -> str:
    try:
        return run("losetup", "--find", "--show", str(path))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device available: {exc.stderr.strip()}")


def detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], capture_output=True)


def unmount_when_free(mount: Mount) -> None:
    """losetup -d lets go of the file asynchronously; retry umount briefly."""
    for _ in range(100):
        if mount.ctl_errno("delete", "vol") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the loop device kept the backend busy")


def test_mkfs_mount_and_remount_through_a_loop_device(mount_factory, images: Path,
                                                      tmp_path: Path) -> None:
    image = images / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    payload = os.urandom(3 << 20)
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    for round_ in range(2):
        mount = mount_factory("--backend", f"vol={image}")
        device = attach(mount / "vol")
        try:
            if round_ == 0:
                run("mkfs.ext4", "-q", device)
            run("mount", device, str(fsdir))
            try:
                if round_ == 0:
                    (fsdir / "payload").write_bytes(payload)
                else:
                    assert hashlib.sha256((fsdir / "payload").read_bytes()).digest() == \
                        hashlib.sha256(payload).digest()
            finally:
                run("umount", str(fsdir))
        finally:
            detach(device)
        unmount_when_free(mount)
        mount.stop()
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
