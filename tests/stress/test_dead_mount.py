"""A mount whose daemon was ``kill -9``'d: ``blkfs umount`` recovers it (a lazy unmount of
the dead FUSE connection) with a clear message and status 0, and the mountpoint serves again."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs.frontends.fuse.operations import ATTR_TIMEOUT
from tests.conftest import needs_fuse
from tests.helpers import Mount, blkfs, errno_of, mounted, wait_until

pytestmark = [needs_fuse]


def kill_9(mount: Mount) -> None:
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(lambda: not mount.alive(), "the daemon's last thread to exit")


def test_umount_of_a_dead_mount_unmounts_lazily_and_says_so(
    images: Path, mount_factory: Callable[..., Mount]
) -> None:
    image = images / "disk.img"
    image.write_bytes(b"\x42" * 65536)
    mount = mount_factory("--backend", f"disk={image}")
    kill_9(mount)
    assert errno_of(os.listdir, mount.path) == errno.ENOTCONN
    assert mounted(mount.path)

    result = blkfs("umount", str(mount.path), check=False)
    assert result.returncode == 0, result.stderr
    assert "had died" in result.stderr and "Transport endpoint is not connected" in result.stderr
    assert not mounted(mount.path)
    assert os.listdir(mount.path) == []

    again = Mount.start(mount.path, "--backend", f"disk={image}")
    try:
        assert (again / "disk").read_bytes() == b"\x42" * 65536
    finally:
        again.stop()
    assert not mounted(mount.path) and not again.alive()


def test_a_dead_mount_with_open_files_is_still_recovered(
    images: Path, mount_factory: Callable[..., Mount]
) -> None:
    """A process that holds a backend file open does not keep a dead mount from going."""
    image = images / "disk.img"
    image.write_bytes(bytes(65536))
    mount = mount_factory("--backend", f"disk={image}")
    with open(mount / "disk", "rb") as disk:
        holder = subprocess.Popen(["sleep", "60"], stdin=disk)
    try:
        kill_9(mount)
        result = blkfs("umount", str(mount.path), check=False)
        assert result.returncode == 0, result.stderr
        assert not mounted(mount.path)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("later", [False, True], ids=["at-once", "after-attr-timeout"])
def test_mounting_over_a_dead_mount_names_the_cure(
    images: Path, mount_factory: Callable[..., Mount], later: bool
) -> None:
    mount = mount_factory()
    kill_9(mount)
    if later:  # the kernel's cached attributes of the mount root have expired: ENOTCONN
        time.sleep(ATTR_TIMEOUT + 0.5)
    result = blkfs("mount", str(mount.path), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "daemon died" in result.stderr and "blkfs umount" in result.stderr, result.stderr
    assert blkfs("umount", str(mount.path), check=False).returncode == 0
    assert not mounted(mount.path)


def test_umount_of_a_plain_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = blkfs("umount", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "not a blkfs mount" in result.stderr
