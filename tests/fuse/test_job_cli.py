"""The snapshot and job commands of ``blkfs`` as users run them: the README's container
walk-through as written, and following jobs from the shell."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from blkfs.cli.umount import loop_devices
from tests.compat.peers import qemu, to_raw
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import BLKFS, blkfs, force_unmount, kill_daemon, mounted, run
from tests.jobs import MiB, jobs, qemu_check_clean

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent
"""Where the environment's ``blkfs`` command is, as a user who installed it has it."""


def walk_through() -> str:
    """The shell block that follows the walk-through marker in README.md."""
    text = README.read_text()
    found = re.search(
        r"<!-- walk-through: container volumes .*?-->\n```sh\n(.*?)```", text, re.DOTALL
    )
    assert found, "README.md lost its container walk-through"
    return found.group(1)


@needs_loop
@pytest.mark.loop
def test_the_readme_container_walk_through_runs_as_written(tmp_path: Path) -> None:
    places = {
        "/srv/vols": tmp_path / "vols",
        "/mnt/vols": tmp_path / "mnt",
        "/srv/web": tmp_path / "web",
        "/srv/db": tmp_path / "db",
    }
    script = walk_through()
    for readme, real in places.items():
        script = script.replace(readme, str(real))
    mountpoint = places["/mnt/vols"]
    try:
        result = subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            env={"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for fs in (places["/srv/web"], places["/srv/db"]):
            subprocess.run(["umount", str(fs)], capture_output=True)
        if mounted(mountpoint):  # the script failed half-way: undo what it did
            pid = json.loads((mountpoint / ".ctl" / "status.json").read_text())["pid"]
            for name in ("web", "db"):
                for device in loop_devices(str(mountpoint / name)):
                    subprocess.run(["losetup", "-d", device], capture_output=True)
            blkfs("umount", str(mountpoint), check=False)
            force_unmount(mountpoint)
            kill_daemon(pid)
    assert "v1" in result.stdout.splitlines()  # the rollback brought the snapshot back
    assert re.search(r"web:\n  root: qcow2 .*\n    file: file .*web\.qcow2", result.stdout)
    vols = places["/srv/vols"]
    for image in ("web.qcow2", "db.qcow2", "web-try.qcow2"):
        qemu_check_clean(str(vols / image))
    for clone, content in (("web", b"v2\n"), ("db", None)):
        raw = tmp_path / f"{clone}.raw"
        qemu("qemu-img", "convert", "-O", "raw", vols / f"{clone}.qcow2", raw)
        run("e2fsck", "-fn", raw)
        read = subprocess.run(
            ["debugfs", "-R", "cat /index.html", str(raw)], capture_output=True
        ).stdout
        assert read == (content or b"")
    assert (
        qemu("qemu-img", "info", "--output=json", vols / "web.qcow2").count(
            '"backing-filename": "base.raw"'
        )
        == 1
    )


def test_a_mirror_followed_from_the_shell(mount_factory, images: Path) -> None:
    source = images / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, "16M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 0 16M", source)
    mount = mount_factory("--backend", f"vol={source}")
    result = blkfs("mirror", str(mount.path), "vol", "moved.qcow2", "--speed", "64M", cwd=images)
    lines = result.stderr.splitlines()  # progress goes to stderr, as lines: not a terminal
    assert lines[-1] == "vol: mirror concluded 16.0 MiB of 16.0 MiB (100%)", lines
    assert any(" ready " in line for line in lines)  # then completed by blkfs mirror
    status = mount.backends()["vol"]["tree"]
    assert status["children"]["file"]["options"]["filename"] == str(images / "moved.qcow2")
    assert (mount / "vol").read_bytes() == b"\x6b" * (16 * MiB)
    listing = blkfs("job", "list", str(mount.path)).stdout
    assert re.search(r"vol\s+mirror\s+vol\s+concluded\s+16\.0 MiB/16\.0 MiB \(100%\)", listing)
    mount.stop()
    assert to_raw(images / "moved.qcow2") == b"\x6b" * (16 * MiB)


def test_job_wait_fails_with_the_jobs_error(mount_factory, images: Path) -> None:
    source = images / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, "16M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 0 16M", source)
    target = images / "t.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", target, "16M")
    mount = mount_factory("--backend", f"vol={source}")
    blkfs(
        "backup",
        str(mount.path),
        "vol",
        "--no-wait",
        "--job-id",
        "b1",
        f"driver=qcow2,file.driver=blkdebug,file.image.driver=file,"
        f"file.image.filename={target},file.inject-error.0.event=write",
    )
    result = blkfs("job", "wait", str(mount.path), "b1", check=False)
    assert result.returncode == 1
    assert "job b1 (backup on vol): " in result.stderr and "Input/output error" in result.stderr
    assert jobs(mount)["b1"]["status"] == "concluded"
    refused = blkfs("snapshot", str(mount.path), "vol", str(source), check=False)
    assert refused.returncode == 1 and "exists" in refused.stderr


def test_job_wait_says_it_stops_at_ready_and_until_concluded_follows_to_the_end(
    mount_factory, images: Path
) -> None:
    """A ready mirror runs until someone completes it: ``job wait`` returns at ready (as
    ``virsh blockcopy --wait`` does) and says so; ``--until concluded`` waits for the end."""
    source = images / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, "16M")
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 0 16M", source)
    mount = mount_factory("--backend", f"vol={source}")
    blkfs("mirror", str(mount.path), "vol", str(images / "m.qcow2"), "--no-wait")
    ready = blkfs("job", "wait", str(mount.path), "vol")
    assert jobs(mount)["vol"]["status"] == "ready"
    assert ready.stderr.splitlines()[-1] == (
        f"vol: ready, still running: blkfs job complete {mount.path} vol ends it "
        "(blkfs job wait --until concluded waits for that)"
    )
    help_text = blkfs("job", "wait", "--help").stdout
    assert "--until {ready,concluded}" in help_text
    with subprocess.Popen(
        [*BLKFS, "job", "wait", "--until", "concluded", str(mount.path), "vol"],
        stderr=subprocess.PIPE,
        text=True,
    ) as waiter:
        assert waiter.stderr is not None
        assert waiter.stderr.readline().startswith("vol: mirror ready ")  # it has looked
        blkfs("job", "complete", str(mount.path), "vol")
        assert waiter.wait(timeout=60) == 0
        assert waiter.stderr.read().splitlines()[-1].startswith("vol: mirror concluded")
    assert jobs(mount)["vol"]["status"] == "concluded"
    assert (
        blkfs("job", "wait", "--until", "later", str(mount.path), "vol", check=False).returncode
        == 2
    )


def test_a_snapshot_takes_the_overlays_qcow2_options(mount_factory, images: Path) -> None:
    source = images / "src.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", source, "16M")
    mount = mount_factory("--backend", f"vol={source}")
    refused = blkfs(
        "snapshot",
        str(mount.path),
        "vol",
        str(images / "bad.qcow2"),
        "--cluster-size",
        "3k",
        check=False,
    )
    assert refused.returncode == 1 and "cluster_size must be a power of two" in refused.stderr
    assert not (images / "bad.qcow2").exists()
    overlay = images / "s.qcow2"
    blkfs(
        "snapshot",
        str(mount.path),
        "vol",
        str(overlay),
        "--cluster-size",
        "16k",
        "--extended-l2",
        "--compression-type",
        "zstd",
    )
    info = json.loads(qemu("qemu-img", "info", "-U", "--output=json", overlay))
    specific = info["format-specific"]["data"]
    assert info["cluster-size"] == 16384 and specific["extended-l2"] is True
    assert specific["compression-type"] == "zstd"
    assert info["backing-filename"] == source.name


def test_an_incremental_backup_from_the_shell(mount_factory, images: Path) -> None:
    """blkfs bitmap and blkfs backup --sync incremental: the second backup holds only what
    was written after the first, and restores onto it to the backend's content."""
    image = images / "d.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
    mount = mount_factory(
        "--backend", f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}"
    )
    with open(mount / "d", "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), b"A" * (4 * MiB), 0)
    blkfs("bitmap", "add", str(mount.path), "img", "inc", "--persistent")
    blkfs("backup", str(mount.path), "d", str(images / "full.qcow2"), "--bitmap", "inc")
    with open(mount / "d", "r+b", buffering=0) as f:
        os.pwrite(f.fileno(), b"B" * 65536, 8 * MiB)
    blkfs(
        "backup",
        str(mount.path),
        "d",
        str(images / "inc.qcow2"),
        "--sync",
        "incremental",
        "--bitmap",
        "inc",
        "--job-id",
        "inc",
    )
    extents = json.loads(
        run("qemu-img", "map", "--output=json", "-f", "qcow2", images / "inc.qcow2")
    )
    copied = sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)
    assert copied == 65536  # only what was written since the full backup
    run(
        "qemu-img",
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        images / "full.qcow2",
        "-F",
        "qcow2",
        images / "inc.qcow2",
    )
    run("qemu-img", "commit", "-q", "-f", "qcow2", images / "inc.qcow2")
    with open(mount / "d", "rb") as f:
        live = f.read()
    restored = images / "restored.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", images / "full.qcow2", restored)
    assert restored.read_bytes() == live
    bad = blkfs("bitmap", "merge", str(mount.path), "img", "inc", "nosuch", check=False)
    assert bad.returncode != 0 and "nosuch" in bad.stderr
