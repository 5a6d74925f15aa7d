"""Nothing changes a volume beneath its user (issue #23): the block layer answers every
change of a backend, whichever frontend sends it. Each test here failed on the code before
the guards moved into the backend:

* rollback and delete of a backend a mounted filesystem writes through a loop device;
* a truncate or fallocate through the mount while a job runs on the backend;
* a snapshot that made read-only media writable.

A snapshot under a job was refused before too, by the command layer; it stays refused now
that the rule lives in the backend, before the overlay's file is made.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.compat.peers import qemu
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import (
    Mount,
    blkfs,
    errno_of,
    loop_device,
    mounted_fs,
    pattern_image,
    run,
    without_stats,
)
from tests.jobs import MiB, frozen, jobs, qemu_check_clean, wait_job

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]


def ctl_state(mount: Mount) -> dict[str, object]:
    """What a refused command must leave as it was: every backend's tree, size and users."""
    return {
        name: (without_stats(b["tree"]), b["size"], b["open"], b["writers"])
        for name, b in mount.backends().items()
    }


@needs_loop
@pytest.mark.loop
def test_rollback_and_delete_under_a_mounted_filesystem_are_refused(
    mount_factory, images: Path, tmp_path: Path
) -> None:
    base, overlay = images / "base.qcow2", images / "s1.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    mount = mount_factory("--backend", f"vol={base}")
    run("mkfs.ext4", "-q", mount / "vol")
    where = tmp_path / "fs"
    with loop_device(mount / "vol") as device:
        with mounted_fs(device, where) as fs:
            (fs / "before").write_bytes(b"kept")
            with frozen(where):
                mount.ctl("snapshot", f"vol {overlay}")
            (fs / "after").write_bytes(os.urandom(MiB))
            os.sync()
            before = ctl_state(mount)

            assert mount.ctl_errno("rollback", "vol") == errno.EBUSY
            assert "open for writing" in mount.last_error()
            assert "losetup -j" in mount.last_error()
            cli = blkfs("rollback", str(mount.path), "vol", check=False)
            assert cli.returncode != 0 and "open for writing" in cli.stderr
            assert mount.ctl_errno("delete", "vol") == errno.EBUSY
            assert errno_of(os.unlink, mount / "vol") == errno.EBUSY
            assert "vol" in os.listdir(mount.path)
            assert ctl_state(mount) == before
            assert (fs / "after").stat().st_size == MiB
        run("e2fsck", "-fn", device)
        mount.ctl("rollback", "vol force=on")  # unmounted: the user says the cache is gone
        with mounted_fs(device, where) as fs:
            assert sorted(p.name for p in fs.iterdir() if p.name != "lost+found") == ["before"]
        run("e2fsck", "-fn", device)
    qemu_check_clean(str(overlay))


def test_truncate_and_fallocate_while_a_job_runs_are_refused(mount: Mount, images: Path) -> None:
    image, target = images / "vol.raw", images / "m.qcow2"
    pattern_image(image, 64 * MiB, image_id=3)
    mount.ctl("create", f"vol {image}")
    mount.ctl("mirror", f"vol {target} speed=1M")
    wait_job(mount, "vol", "running")
    before = ctl_state(mount)

    truncate = subprocess.run(
        ["truncate", "-s", "80M", str(mount / "vol")], capture_output=True, text=True
    )
    assert truncate.returncode != 0 and "busy" in truncate.stderr
    assert "job 'vol' (mirror) is running on it" in mount.last_error()
    grow = subprocess.run(
        ["fallocate", "-o", str(64 * MiB), "-l", str(MiB), str(mount / "vol")],
        capture_output=True,
        text=True,
    )
    assert grow.returncode != 0 and "busy" in grow.stderr
    assert mount.ctl_errno("resize", "vol 80M") == errno.EBUSY
    assert ctl_state(mount) == before
    assert (mount / "vol").stat().st_size == 64 * MiB

    mount.ctl("job-cancel", "vol")
    assert wait_job(mount, "vol", "concluded")["error"] == "cancelled"
    run("truncate", "-s", "80M", mount / "vol")  # the job has ended: the disk is the user's
    assert (mount / "vol").stat().st_size == 80 * MiB


def test_a_snapshot_while_a_job_runs_is_refused_and_leaves_no_file(
    mount: Mount, images: Path
) -> None:
    image, target, overlay = images / "vol.raw", images / "m.qcow2", images / "s.qcow2"
    pattern_image(image, 64 * MiB, image_id=4)
    mount.ctl("create", f"vol {image}")
    mount.ctl("mirror", f"vol {target} speed=1M")
    wait_job(mount, "vol", "running")
    before = ctl_state(mount)
    assert mount.ctl_errno("snapshot", f"vol {overlay}") == errno.EBUSY
    assert "job 'vol' (mirror) is running on it" in mount.last_error()
    assert not overlay.exists()
    assert ctl_state(mount) == before
    mount.ctl("job-cancel", "vol")
    wait_job(mount, "vol", "concluded")
    assert list(jobs(mount)) == ["vol"]


def test_a_snapshot_keeps_read_only_media_read_only(mount_factory, images: Path) -> None:
    cd, overlay = images / "cd.raw", images / "snap.qcow2"
    content = pattern_image(cd, 4 * MiB, image_id=5)
    mount = mount_factory("--backend", f"cd0={cd},read-only=on")
    assert (mount / "cd0").stat().st_mode & 0o777 == 0o444
    blkfs("snapshot", str(mount.path), "cd0", str(overlay))
    assert mount.backends()["cd0"]["read-only"] is True
    assert (mount / "cd0").stat().st_mode & 0o777 == 0o444
    dd = subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={mount / 'cd0'}",
            "bs=4k",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
        capture_output=True,
        text=True,
    )
    assert dd.returncode != 0 and "Read-only file system" in dd.stderr  # root too
    assert (mount / "cd0").read_bytes() == content
    assert cd.read_bytes() == content
    mount.stop()
    qemu_check_clean(str(overlay))
