"""Thin clones over one base (README's container walk-through): no job of one backend writes
an image another backend reads, so nobody's disk changes beneath it. A commit into the shared
base, a mirror or backup onto a node another backend reads, are refused with EBUSY naming
that backend before a byte is copied; QEMU's own tools meet the same refusal through the
image locks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.compat.peers import qemu, qemu_io, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, without_stats
from tests.jobs import MiB, jobs, status_chain, wait_job

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
SIZE = 16 * MiB
DB_MODES = pytest.mark.parametrize("db_mode", ["", ",read-only=on"], ids=["db-rw", "db-ro"])


def clones(images: Path, *names: str) -> Path:
    """base.raw (made by qemu-img, a known pattern) and a qcow2 clone over it per name."""
    base = images / "base.raw"
    qemu("qemu-img", "create", "-q", "-f", "raw", base, str(SIZE))
    qemu_io(base, "raw", f"write -P 0x5a 0 {SIZE // 2}", f"write -P 0xa5 {SIZE // 2} {SIZE // 2}")
    for name in names:
        qemu(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            images / f"{name}.qcow2",
        )
    return base


def shell_ctl(mount: Mount, verb: str, text: str) -> subprocess.CompletedProcess[str]:
    """``echo TEXT > MNT/.ctl/VERB`` as a user types it."""
    return subprocess.run(
        ["bash", "-c", 'echo "$1" > "$2"', "bash", text, str(mount / ".ctl" / verb)],
        capture_output=True,
        text=True,
    )


def refused(mount: Mount, verb: str, text: str) -> str:
    """The command fails with EBUSY, starts no job, changes no tree, and says why in
    .ctl/error."""
    before = without_stats(mount.backends())
    result = shell_ctl(mount, verb, text)
    assert result.returncode != 0 and "Device or resource busy" in result.stderr, result
    assert jobs(mount) == {}
    assert without_stats(mount.backends()) == before
    return mount.last_error()


@DB_MODES
def test_a_commit_into_a_base_another_backend_reads_is_refused(
    mount_factory, images: Path, db_mode: str
) -> None:
    base = clones(images, "web", "db")
    base_before = base.read_bytes()
    db_before = to_raw(images / "db.qcow2")
    mount = mount_factory(
        "--backend",
        f"web={images / 'web.qcow2'}",
        "--backend",
        f"db={images / 'db.qcow2'}{db_mode}",
    )
    ours = bytes(range(256)) * (4 * MiB // 256)
    with open(mount / "web", "r+b") as f:
        f.write(ours)

    error = refused(mount, "commit", "web")  # the default base: the shared base.raw
    assert "'db'" in error and "base.raw" in error, error

    assert (mount / "db").read_bytes() == db_before
    assert (mount / "web").read_bytes()[: 4 * MiB] == ours
    assert base.read_bytes() == base_before
    mount.stop()
    assert to_raw(images / "db.qcow2") == db_before
    assert base.read_bytes() == base_before


@DB_MODES
def test_an_intermediate_commit_into_a_shared_base_is_refused(
    mount_factory, images: Path, db_mode: str
) -> None:
    base = clones(images, "web", "db")
    qemu_io(images / "web.qcow2", "qcow2", f"write -P 0x33 0 {4 * MiB}")
    webtop = images / "webtop.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "web.qcow2", "-F", "qcow2", webtop)
    base_before, db_before = base.read_bytes(), to_raw(images / "db.qcow2")
    web_before = to_raw(webtop)
    mount = mount_factory(
        "--backend", f"web={webtop}", "--backend", f"db={images / 'db.qcow2'}{db_mode}"
    )

    error = refused(mount, "commit", f"web top={images / 'web.qcow2'} base={base}")
    assert "'db'" in error and "base.raw" in error, error

    assert (mount / "db").read_bytes() == db_before
    assert (mount / "web").read_bytes() == web_before
    mount.stop()
    assert to_raw(images / "db.qcow2") == db_before
    assert to_raw(webtop) == web_before
    assert base.read_bytes() == base_before


def test_a_commit_into_a_base_only_its_chain_reads_still_works(mount_factory, images: Path) -> None:
    """The refusal is about other users: with db gone, web's commit into base.raw runs."""
    base = clones(images, "web", "db")
    mount = mount_factory(
        "--backend", f"web={images / 'web.qcow2'}", "--backend", f"db={images / 'db.qcow2'}"
    )
    ours = b"\x77" * MiB
    with open(mount / "web", "r+b") as f:
        f.write(ours)
    mount.ctl("delete", "db")
    mount.ctl("commit", "web")
    wait_job(mount, "web", "ready")
    mount.ctl("job-complete", "web")
    assert wait_job(mount, "web", "concluded")["error"] is None
    assert status_chain(mount, "web") == [str(base)]
    mount.stop()
    assert base.read_bytes()[:MiB] == ours


@DB_MODES
def test_qemu_img_commit_into_a_base_blkfs_reads_is_refused_by_the_locks(
    mount_factory, images: Path, db_mode: str
) -> None:
    base = clones(images, "web", "db")
    qemu_io(images / "web.qcow2", "qcow2", f"write -P 0x33 0 {4 * MiB}")
    base_before = base.read_bytes()
    mount = mount_factory("--backend", f"db={images / 'db.qcow2'}{db_mode}")
    commit = subprocess.run(
        ["qemu-img", "commit", str(images / "web.qcow2")], capture_output=True, text=True
    )
    assert commit.returncode != 0 and "lock" in commit.stderr, commit
    assert base.read_bytes() == base_before
    assert (mount / "db").read_bytes() == base_before


@DB_MODES
@pytest.mark.parametrize("job", ["mirror", "backup"])
def test_a_mirror_or_backup_onto_a_node_another_backend_reads_is_refused(
    mount_factory, images: Path, job: str, db_mode: str
) -> None:
    """A base opened writable by node-add, then db's backing file: a job of web may not
    write it (node=NAME, as QMP's blockdev-mirror and blockdev-backup take it)."""
    clones(images, "web", "db")
    shared = images / "shared.raw"
    shared.write_bytes(b"\x11" * SIZE)
    mount = mount_factory("--backend", f"web={images / 'web.qcow2'}")
    mount.ctl("node-add", f"shared driver=raw,file.driver=file,file.filename={shared}")
    mount.ctl(
        "create",
        f"db driver=qcow2,file.driver=file,"
        f"file.filename={images / 'db.qcow2'},backing=shared{db_mode}",
    )
    assert (mount / "db").read_bytes() == shared.read_bytes()

    error = refused(mount, job, "web node=shared")
    assert "'db'" in error, error
    assert (mount / "db").read_bytes() == b"\x11" * SIZE
    mount.stop()
    assert shared.read_bytes() == b"\x11" * SIZE
