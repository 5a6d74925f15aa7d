"""Filters put into and taken out of a live container volume: a loop device with a mounted
ext4 and a writer, while throttle comes and goes in front of the image. The writer sees no
error, the throttle holds it back while it is in, and the filesystem checks clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.compat.peers import qemu
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import Mount, loop_device, mounted_fs, run, wait_until

pytestmark = [needs_fuse, pytest.mark.fuse, needs_loop, pytest.mark.loop, needs_qemu]
ROOT = Path(__file__).resolve().parents[2]


def throttled(mount: Mount) -> int:
    tree = mount.backends()["vol"]["tree"]
    return tree["info"]["throttled-requests"] if tree["driver"] == "throttle" else 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_throttle_in_and_out_under_a_mounted_filesystem(
    mount_factory, images: Path, tmp_path: Path, fmt: str
) -> None:
    image = images / f"vol.{fmt}"
    qemu("qemu-img", "create", "-q", "-f", fmt, image, "128M")
    mount = mount_factory("--backend", f"vol={image}")
    root = mount.backends()["vol"]["tree"]["node-name"]
    spelled = f"file.driver={fmt},file.file.driver=file,file.file.filename={image}"
    stop = tmp_path / "stop"
    with loop_device(mount / "vol") as device:
        run("mkfs.ext4", "-q", device)
        with (
            mounted_fs(device, tmp_path / "fs") as fs,
            subprocess.Popen(
                [sys.executable, "-m", "tests.fs_writer", str(fs), str(stop)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            ) as writer,
        ):
            assert writer.stdout is not None
            try:

                def written(count: int) -> None:
                    for _ in range(count):
                        line = writer.stdout.readline()  # type: ignore[union-attr]
                        assert line and not line.startswith("error"), line

                written(3)
                # in, naming the live root node: the old tree's nodes are taken over
                # limits any writer exceeds (each file is 1 MiB and several requests), so
                # that the throttle holds it however slow a loaded machine makes it
                mount.ctl(
                    "change", f"vol driver=throttle,node-name=thr,limits.bps-write=512k,file={root}"
                )
                wait_until(
                    lambda: throttled(mount) > 0, "the throttle to hold the writer", seconds=60
                )
                mount.ctl("change", f"vol node={root}")  # out again
                assert mount.backends()["vol"]["tree"]["node-name"] == root
                written(3)
                # in again, spelled as options: the same image, so the same nodes
                mount.ctl(
                    "change", f"vol driver=throttle,node-name=thr,limits.iops-write=2,{spelled}"
                )
                assert mount.backends()["vol"]["tree"]["children"]["file"]["node-name"] == root
                wait_until(
                    lambda: throttled(mount) > 0, "the throttle to hold the writer", seconds=60
                )
                mount.ctl("change", f"vol node={root}")
                written(3)
            finally:
                stop.touch()
            rest = writer.stdout.read()
            assert writer.wait() == 0, rest
        run("e2fsck", "-fn", device)
    if fmt == "qcow2":
        mount.stop()
        qemu("qemu-img", "check", image)
