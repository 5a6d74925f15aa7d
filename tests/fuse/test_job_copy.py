"""How jobs copy: several chunks in flight while a writer races them, holes skipped, and
host-to-host copies (copy_file_range) that give the bytes the plain path gives."""

from __future__ import annotations

import json
import os
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


def allocated(path: Path) -> int:
    """Bytes the host file takes on disk."""
    return os.stat(path).st_blocks * 512


def data_in(image: Path) -> int:
    """Bytes of data the image itself holds, as qemu-img maps it."""
    extents = json.loads(qemu("qemu-img", "map", "--output=json", image))
    return sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)


def test_a_sparse_source_stays_sparse(mount_factory, images: Path) -> None:
    """Holes are not copied as data: not by convert to raw or qcow2, not by a live mirror."""
    source = images / "sparse.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", source, str(4 * SIZE))
    qemu_io(source, "raw", "write -P 0x61 5M 1M", "write -P 0x62 100M 64k")
    held = 2 * MiB
    for fmt in ("raw", "qcow2"):
        out = images / f"out.{fmt}"
        blkfs("image", "convert", "-O", fmt, str(source), str(out))
        assert to_raw(out) == source.read_bytes()
        assert (allocated(out) if fmt == "raw" else data_in(out)) <= held
    mount = mount_factory("--backend", f"vol=driver=raw,file.driver=file,file.filename={source}")
    mirrored = images / "m.raw"
    mount.ctl("mirror", f"vol {mirrored} format=raw")
    wait_job(mount, "vol", "ready")
    mount.ctl("job-complete", "vol")
    assert wait_job(mount, "vol", "concluded")["error"] is None
    mount.stop()
    assert mirrored.read_bytes() == source.read_bytes()
    assert allocated(mirrored) <= held


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_copy_between_host_files_gives_the_bytes_the_plain_path_gives(
    mount_factory, images: Path, fmt: str
) -> None:
    """The same chain backed up to a new image twice: once straight (each data extent goes
    from host file to host file, into a qcow2 target's new clusters too, so the image nodes
    read nothing), once with every image file behind blkdebug (a filter that must see each
    request: the plain path)."""
    for d in ("direct", "plain"):
        (images / d).mkdir()
        base, top = images / d / "base.qcow2", images / d / "top.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
        qemu_io(base, "qcow2", f"write -P 0x11 0 {SIZE // 2}", "write -z 4M 1M")
        qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
        qemu_io(top, "qcow2", "write -P 0x33 2M 3M", "write -P 0x44 20M 64k")
    direct, plain = images / "direct", images / "plain"
    mount = mount_factory(
        "--backend",
        f"direct=driver=qcow2,node-name=direct-top,read-only=on,"
        f"file.driver=file,file.filename={direct / 'top.qcow2'}",
        "--backend",
        f"plain=driver=qcow2,node-name=plain-top,read-only=on,"
        f"file.driver=blkdebug,file.image.driver=file,file.image.filename={plain / 'top.qcow2'},"
        f"backing.driver=qcow2,backing.node-name=plain-base,backing.file.driver=blkdebug,"
        f"backing.file.image.driver=file,backing.file.image.filename={plain / 'base.qcow2'}",
    )
    for name in ("direct", "plain"):
        mount.ctl("backup", f"{name} {images / name}.{fmt} format={fmt}")
    for name in ("direct", "plain"):
        assert wait_job(mount, name, "concluded")["error"] is None

    def read_bytes(backend: str, name: str) -> int:
        return int(node(mount.backends()[backend]["tree"], name)["stats"]["read_bytes"])

    assert read_bytes("direct", "direct-top") == 0
    assert read_bytes("plain", "plain-top") > 0 and read_bytes("plain", "plain-base") > 0
    mount.stop()
    expected = to_raw(direct / "top.qcow2")
    for name in ("direct", "plain"):
        target = images / f"{name}.{fmt}"
        if fmt == "qcow2":
            qemu_check_clean(str(target))
        assert to_raw(target) == expected
