"""QEMU's error policy (issue #30): a full host pauses a thin volume instead of failing its
filesystem's writes, and ``cont`` retries them once there is room; a read error pauses a
backend with ``rerror=stop``. Real loop devices, ext4 and a small tmpfs as the host disk."""

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
    errno_of,
    loop_device,
    mounted_fs,
    pattern_image,
    run,
    tmpfs,
    wait_until,
)
from tests.jobs import MiB, qemu_check_clean

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]


def pause_of(mount: Mount, name: str) -> dict[str, object] | None:
    paused: dict[str, object] | None = mount.backends()[name]["paused"]
    return paused


def make_room(mount: Mount, host: Path, name: str) -> None:
    """What the administrator does: grow the host filesystem, then resume the backend."""
    run("mount", "-o", "remount,size=1g", host)
    mount.ctl("cont", name)


@needs_loop
@pytest.mark.loop
@pytest.mark.parametrize("policy", ["", ",werror=report"])
def test_a_full_host_pauses_the_volume_and_cont_finishes_the_writes(
    policy: str, mount_factory, images: Path, tmp_path: Path
) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(80 * MiB))
    with tmpfs(tmp_path / "host", "48m") as host:
        image = host / "vol.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", image, "256M")
        mount = mount_factory("--backend", f"vol={image}{policy}")
        with loop_device(mount / "vol") as device:
            run("mkfs.ext4", "-q", "-E", "nodiscard", device)
            where = tmp_path / "fs"
            with mounted_fs(device, where):
                writer = subprocess.Popen(
                    [
                        "dd",
                        f"if={payload}",
                        f"of={where / 'payload'}",
                        "bs=1M",
                        "conv=fsync",
                        "status=none",
                    ],
                    stderr=subprocess.PIPE,
                    text=True,
                )
                try:
                    if policy:  # werror=report: the error reaches the filesystem
                        assert writer.wait(timeout=300) != 0
                        assert pause_of(mount, "vol") is None
                        return
                    wait_until(
                        lambda: pause_of(mount, "vol") is not None,
                        "the backend to pause",
                        seconds=300,
                    )
                    pause = pause_of(mount, "vol")
                    assert pause is not None and pause["errno"] == "ENOSPC"
                    assert pause["operation"] == "write"
                    assert mount.backends()["vol"]["io-status"] == "nospace"
                    assert "paused since" in (mount.path / ".ctl" / "status").read_text()
                    assert writer.poll() is None  # held, not failed
                    assert mount.ctl_errno("eject", "vol") == errno.EBUSY
                    assert "paused since" in mount.last_error()
                    assert "cont vol" in mount.last_error()

                    make_room(mount, host, "vol")
                    assert writer.wait(timeout=300) == 0, writer.stderr
                finally:  # a writer held in the kernel cannot be killed: let it finish
                    make_room(mount, host, "vol")
                    writer.communicate(timeout=300)
                assert mount.backends()["vol"]["io-status"] == "ok"
            run("e2fsck", "-fn", device)
            with mounted_fs(device, where):
                assert (where / "payload").read_bytes() == payload.read_bytes()
        mount.stop()
        qemu_check_clean(str(image))


def test_rerror_stop_holds_a_failing_read_until_cont(
    mount_factory, images: Path, tmp_path: Path
) -> None:
    image = images / "disk.img"
    data = pattern_image(image, 4 * MiB, image_id=2)
    bad = 2048  # sector: the first of MiB 1
    mount = mount_factory(
        "--backend",
        f"d=driver=blkdebug,node-name=dbg,"
        f"inject-error.0.event=read,inject-error.0.sector={bad},"
        f"inject-error.0.errno=EIO,image.driver=file,"
        f"image.filename={image},rerror=stop",
    )
    assert mount.backends()["d"]["rerror"] == "stop"
    copy = tmp_path / "copy"
    reader = subprocess.Popen(["dd", f"if={mount / 'd'}", f"of={copy}", "bs=64k", "status=none"])
    try:
        wait_until(lambda: pause_of(mount, "d") is not None, "the backend to pause")
        pause = pause_of(mount, "d")
        assert pause is not None and pause["errno"] == "EIO" and pause["node"] == "dbg"
        assert mount.backends()["d"]["io-status"] == "failed"
        assert reader.poll() is None
        # another backend and the control files keep serving meanwhile
        other = mount.path / "other"
        mount.ctl("create", f"other {image},read-only=on")
        assert other.read_bytes()[:4096] == data[:4096]
        mount.ctl("delete", "other")
        mount.ctl("reopen", "dbg inject-error=none")  # the disk is healed
        mount.ctl("cont", "d")
        assert reader.wait(timeout=60) == 0
    finally:  # a reader held in the kernel cannot be killed: let it go
        mount.ctl("reopen", "dbg inject-error=none")
        mount.ctl("cont", "d")
        reader.wait(timeout=60)
    assert copy.read_bytes() == data
    assert pause_of(mount, "d") is None


def test_force_on_gives_up_a_pause_and_the_held_request_fails(mount_factory, images: Path) -> None:
    image = images / "disk.img"
    pattern_image(image, 4 * MiB, image_id=3)
    mount = mount_factory(
        "--backend",
        f"d=driver=blkdebug,node-name=dbg,"
        f"inject-error.0.event=read,inject-error.0.sector=0,"
        f"inject-error.0.errno=EIO,image.driver=file,"
        f"image.filename={image},rerror=stop",
    )
    fd = os.open(mount / "d", os.O_RDONLY)
    try:
        reader = subprocess.Popen(
            ["dd", f"if={mount / 'd'}", "bs=4k", "count=1", "status=none"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: pause_of(mount, "d") is not None, "the backend to pause")
        for verb in ("eject", "delete", "resize"):
            text = "d 8M" if verb == "resize" else "d"
            assert mount.ctl_errno(verb, text) == errno.EBUSY, verb
        assert pause_of(mount, "d") is not None
        mount.ctl("eject", "d force=on")
        _, err = reader.communicate(timeout=60)
        assert reader.returncode != 0 and "Input/output error" in err
        assert mount.backends()["d"]["medium"] is False
        assert errno_of(os.pread, fd, 512, 0) == errno.ENOMEDIUM
    finally:
        os.close(fd)


def test_set_changes_the_policy_live_and_bad_values_change_nothing(
    mount: Mount, images: Path
) -> None:
    image = images / "disk.img"
    pattern_image(image, MiB, image_id=4)
    mount.ctl("create", f"d {image}")
    backend = mount.backends()["d"]
    assert (backend["werror"], backend["rerror"]) == ("enospc", "report")
    mount.ctl("set", "d werror=stop rerror=ignore")
    assert (mount.backends()["d"]["werror"], mount.backends()["d"]["rerror"]) == ("stop", "ignore")
    before = mount.backends()
    assert mount.ctl_errno("set", "d werror=sometimes") == errno.EINVAL
    assert mount.ctl_errno("set", "nosuch werror=stop") == errno.ENOENT
    assert mount.ctl_errno("create", f"e {image},rerror=maybe") == errno.EINVAL
    assert mount.backends() == before
    mount.ctl("cont", "")  # no name: every paused backend; none is
