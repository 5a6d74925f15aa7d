"""Incremental backup of a live backend, restored with QEMU's tools: a full backup, then
three incrementals, through the backup job (sync=incremental) and through the NBD export's
``qemu:dirty-bitmap`` context (nbdinfo --map, nbdcopy); applied in order onto the full one,
each restores the backend's content of its moment, also with writes during each backup."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.compat.peers import MiB, create, qemu, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.fuse.test_bitmaps import bitmaps_of
from tests.helpers import Mount
from tests.jobs import ModelWriter, wait_job
from tests.nbdpeers import needs_nbd_tools

pytestmark = [needs_qemu, needs_nbd_tools, needs_fuse, pytest.mark.fuse]
SIZE = 32 * MiB


@pytest.fixture
def live(mount_factory: Callable[..., Mount], images: Path, tmp_path: Path) -> Mount:
    image = create(images, "live.qcow2", size=SIZE)
    return mount_factory(
        "--backend",
        f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}",
        "--nbd",
        f"unix:{tmp_path / 'nbd.sock'}",
    )


def differs(got: bytes | bytearray, want: bytes) -> int | None:
    """The first byte where ``got`` is not ``want`` (None if none): asserted as such, so a
    failure does not diff megabytes."""
    if got == want:
        return None
    return next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), len(got))


def apply(increment: Path, onto: Path) -> None:
    """QEMU's restore of an incremental backup: the increment over the previous state,
    committed into it."""
    qemu("qemu-img", "rebase", "-u", "-F", "qcow2", "-b", onto, increment)
    qemu("qemu-img", "commit", "-q", increment)


@pytest.mark.parametrize("during", [False, True], ids=["quiet", "writes-during"])
def test_incremental_backups_by_the_backup_job(live: Mount, images: Path, during: bool) -> None:
    with ModelWriter(live / "d", SIZE) as writer:
        writer.wrote_more(40)
        live.ctl("bitmap-add", "img name=inc")
        with writer.paused():
            moment = bytes(writer.model)
            live.ctl(  # the full backup starts the bitmap afresh (bitmap-mode=on-success)
                "backup",
                f"d {images / 'full.qcow2'} job-id=full bitmap=inc bitmap-mode=on-success "
                + ("speed=4M" if during else ""),
            )
        if during:
            writer.wrote_more(10)
        assert wait_job(live, "full", "concluded")["error"] is None
        live.ctl("job-dismiss", "full")
        restored = images / "full.qcow2"
        assert differs(to_raw(restored), moment) is None
        for round_ in range(3):
            writer.wrote_more(30)
            increment = images / f"inc{round_}.qcow2"
            with writer.paused():
                moment = bytes(writer.model)
                live.ctl(
                    "backup",
                    f"d {increment} job-id=i{round_} sync=incremental bitmap=inc"
                    + (" speed=1M" if during else ""),
                )
            if during:
                writer.wrote_more(10)
            job = wait_job(live, f"i{round_}", "concluded")
            assert job["error"] is None
            live.ctl("job-dismiss", f"i{round_}")
            if not during:  # only what changed (a busy writer changes most of it)
                assert job["total-progress"] < SIZE // 2
            apply(increment, restored)
            assert differs(to_raw(restored), moment) is None, f"round {round_}"
        writer.agrees()


def dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def test_incremental_backups_through_the_nbd_export(live: Mount, tmp_path: Path) -> None:
    sock = tmp_path / "inc.sock"
    uri = f"nbd+unix:///d?socket={sock}"
    with ModelWriter(live / "d", SIZE) as writer:
        writer.wrote_more(40)
        with writer.paused():
            live.ctl("bitmap-add", "img name=inc")
            restored = bytearray(writer.model)  # the full backup
        for round_ in range(3):
            writer.wrote_more(30)
            with writer.paused():  # a pull backup of a quiet disk: the export's moment
                moment = bytes(writer.model)
                live.ctl("export", f"d socket={sock} bitmap=inc")
                assert live.ctl_errno("bitmap-clear", "img name=inc") == errno.EBUSY
                extents = dirty_extents(uri, "inc")
                copy = tmp_path / f"copy{round_}.raw"
                subprocess.run(["nbdcopy", uri, str(copy)], check=True)
                live.ctl("export-del", "d")
                live.ctl("bitmap-clear", "img name=inc")
            data = copy.read_bytes()
            assert sum(length for _, length in extents) < SIZE // 2
            for offset, length in extents:
                restored[offset : offset + length] = data[offset : offset + length]
            assert differs(restored, moment) is None, f"round {round_}"
    assert bitmaps_of(live)["inc"]["busy"] is False


@pytest.mark.parametrize(
    ("words", "code"),
    [
        ("sync=incremental", errno.EINVAL),
        ("sync=bitmap bitmap=inc", errno.EINVAL),
        ("sync=incremental bitmap=inc bitmap-mode=always", errno.EINVAL),
        ("sync=incremental bitmap=nosuch", errno.ENOENT),
        ("bitmap-mode=never", errno.EINVAL),
    ],
)
def test_bad_bitmap_backups_are_refused(live: Mount, images: Path, words: str, code: int) -> None:
    live.ctl("bitmap-add", "img name=inc")
    assert live.ctl_errno("backup", f"d {images / 'x.qcow2'} {words}") == code
    assert not (images / "x.qcow2").exists()
    assert bitmaps_of(live)["inc"]["busy"] is False
