"""A backend file as a loop device: mkfs, mount, and the filesystem survives a remount."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_loop
from tests.helpers import Mount, loop_device, mounted_fs, run, wait_until

pytestmark = [needs_fuse, pytest.mark.fuse, needs_loop, pytest.mark.loop]


def delete_when_free(mount: Mount, name: str) -> None:
    """losetup -d lets go of the file asynchronously."""
    wait_until(lambda: mount.ctl_errno("delete", name) == 0, f"the loop device to free {name}")


def test_mkfs_mount_and_remount_through_a_loop_device(
    mount_factory, images: Path, tmp_path: Path
) -> None:
    image = images / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    payload = os.urandom(3 << 20)
    for round_ in range(2):
        mount = mount_factory("--backend", f"vol={image}")
        with loop_device(mount / "vol") as device:
            if round_ == 0:
                run("mkfs.ext4", "-q", device)
            with mounted_fs(device, tmp_path / "fs") as fs:
                if round_ == 0:
                    (fs / "payload").write_bytes(payload)
                else:
                    assert (
                        hashlib.sha256((fs / "payload").read_bytes()).digest()
                        == hashlib.sha256(payload).digest()
                    )
        delete_when_free(mount, "vol")
        mount.stop()
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
