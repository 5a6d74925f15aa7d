"""How jobs copy: several chunks in flight while a writer races them, holes skipped, and
host-to-host copies (copy_file_range) that give the bytes the plain path gives."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.compat.peers import qemu, qemu_io, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import blkfs, node, wait_until
from tests.jobs import MiB, ModelWriter, qemu_check_clean, wait_job

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
SIZE = 32 * MiB


def test_a_mirror_with_chunks_in_flight_loses_no_racing_write(mount_factory, images: Path) -> None:
    """The target's writes are held half a second, so many chunks are in flight at once,
    while a writer writes all over the disk; then the job may catch up. Completed, the
    target holds exactly what the writer wrote. (A raw target: a new qcow2 one allocates
    one write at a time.)"""
    source = images / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, str(SIZE))
    qemu_io(source, "qcow2", f"write -P 0x5a 0 {SIZE}")
    target = images / "m.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", target, str(SIZE))
    mount = mount_factory("--backend", f"vol={source}")
    mount.ctl(
        "node-add",
        f"tgt driver=raw,file.driver=blkdebug,file.node-name=slow,file.delay.write=500ms,"
        f"file.image.driver=file,file.image.filename={target}",
    )
    peak = 0

    def several_in_flight() -> bool:
        nonlocal peak
        for tree in mount.status()["nodes"]:
            peak = max(peak, int(node(tree, "slow")["info"]["delayed"]))
        return peak > 1

    with ModelWriter(mount / "vol", SIZE) as writer:
        mount.ctl("mirror", "vol node=tgt")
        wait_until(several_in_flight, "several chunks in flight at once")
        writer.wrote_more()  # into ranges copied, being copied and still to copy
        mount.ctl("reopen", "slow delay.write=0")  # now the job can catch up
        wait_job(mount, "vol", "ready")
        writer.wrote_more()
        mount.ctl("job-complete", "vol")
        assert wait_job(mount, "vol", "concluded")["error"] is None
        writer.agrees()
    mount.stop()
    assert target.read_bytes() == writer.model
