"""Live snapshots, rollback and block jobs on a backend that a writer uses the whole time:
after each step the backend holds what a model that got the same writes holds (minus the
rolled-back ones), ``qemu-img check`` is clean on every image, and the chain ``.ctl/status``
shows is the one ``qemu-img info --backing-chain`` reads from the image headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.peers import qemu, to_raw
from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import Mount, loop_device, mounted_fs, run
from tests.jobs import (
    FsWriter,
    MiB,
    ModelWriter,
    frozen,
    jobs,
    qemu_chain,
    qemu_check_clean,
    status_chain,
    wait_job,
)

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
SIZE = 48 * MiB


def consistent(mount: Mount, writer: ModelWriter, chain: list[Path]) -> None:
    """The backend agrees with the model; its chain is ``chain`` for blkfs and for
    qemu-img; every image in it checks clean."""
    writer.agrees()
    with writer.paused():
        assert status_chain(mount, "vol") == [str(p) for p in chain]
        assert qemu_chain(str(chain[0])) == [str(p) for p in chain]
        for image in chain:
            qemu_check_clean(str(image))


def test_snapshot_rollback_commit_stream_mirror_backup_under_a_writer(
    mount_factory, images: Path
) -> None:
    base, s1, s2 = images / "base.qcow2", images / "s1.qcow2", images / "s2.qcow2"
    mirrored, backed_up = images / "m.qcow2", images / "b.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    mount = mount_factory("--backend", f"vol={base}")
    with ModelWriter(mount / "vol", SIZE) as writer:
        writer.wrote_more()
        consistent(mount, writer, [base])

        with writer.paused():  # as fsfreeze would: no write straddles the snapshot
            mount.ctl("snapshot", f"vol {s1}")
            at_snapshot = bytes(writer.model)
        writer.wrote_more()
        consistent(mount, writer, [s1, base])

        with writer.paused():  # its writes are all in: rolling back under it is its wish
            mount.ctl("rollback", "vol force=on")
            assert (mount / "vol").read_bytes() == at_snapshot
            writer.model[:] = at_snapshot
        writer.wrote_more()
        consistent(mount, writer, [s1, base])

        with writer.paused():
            mount.ctl("snapshot", f"vol {s2}")
        writer.wrote_more()
        consistent(mount, writer, [s2, s1, base])

        mount.ctl("commit", f"vol base={s1}")  # the active image: a mirror into s1
        wait_job(mount, "vol", "ready")
        writer.wrote_more()
        mount.ctl("job-complete", "vol")
        assert wait_job(mount, "vol", "concluded")["error"] is None
        consistent(mount, writer, [s1, base])

        mount.ctl("stream", "vol")
        assert wait_job(mount, "vol", "concluded")["error"] is None
        consistent(mount, writer, [s1])

        mount.ctl("mirror", f"vol {mirrored}")
        wait_job(mount, "vol", "ready")
        writer.wrote_more()
        mount.ctl("job-complete", "vol")
        assert wait_job(mount, "vol", "concluded")["error"] is None
        consistent(mount, writer, [mirrored])

        with writer.paused():
            mount.ctl("backup", f"vol {backed_up}")
            at_backup = bytes(writer.model)
        writer.wrote_more(50)
        assert wait_job(mount, "vol", "concluded")["error"] is None
        consistent(mount, writer, [mirrored])
    qemu_check_clean(str(backed_up))
    assert to_raw(backed_up) == at_backup
    assert [job["status"] for job in jobs(mount).values()] == ["concluded"]


@needs_loop
@pytest.mark.loop
def test_the_same_steps_under_a_mounted_ext4_check_clean_after_each(
    mount_factory, images: Path, tmp_path: Path
) -> None:
    """A container's volume: ext4 loop-mounted on the backend, files written all along;
    frozen for each snapshot and each check, unmounted for the rollback."""
    base, s1, s2 = images / "base.qcow2", images / "s1.qcow2", images / "s2.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "128M")
    mount = mount_factory("--backend", f"vol={base}")
    run("mkfs.ext4", "-q", mount / "vol")
    where, stop = tmp_path / "fs", tmp_path / "stop"

    with loop_device(mount / "vol") as device:

        def fsck() -> None:  # on the frozen filesystem: what its disk holds is consistent
            with frozen(where):
                run("e2fsck", "-fn", device)

        with mounted_fs(device, where), FsWriter(where, stop) as writer:
            writer.written()
            with frozen(where):
                mount.ctl("snapshot", f"vol {s1}")
            writer.written()
            fsck()
        mount.ctl("rollback", "vol force=on")  # unmounted (the loop device stays): no cache
        run("e2fsck", "-fn", device)
        with mounted_fs(device, where), FsWriter(where, stop) as writer:
            with frozen(where):
                mount.ctl("snapshot", f"vol {s2}")
            writer.written()
            fsck()
            for verb, text in (
                ("commit", f"vol base={s1}"),
                ("stream", "vol"),
                ("mirror", f"vol {images / 'm.qcow2'}"),
                ("backup", f"vol {images / 'b.qcow2'}"),
            ):
                if verb == "backup":  # the moment it copies: a consistent filesystem
                    with frozen(where):
                        mount.ctl(verb, text)
                else:
                    mount.ctl(verb, text)
                if verb in ("commit", "mirror"):
                    wait_job(mount, "vol", "ready")
                    writer.written()
                    mount.ctl("job-complete", "vol")
                assert wait_job(mount, "vol", "concluded")["error"] is None
                writer.written()
                fsck()
    assert status_chain(mount, "vol") == [str(images / "m.qcow2")]
    mount.stop()
    for image in ("m.qcow2", "b.qcow2", "s1.qcow2", "base.qcow2"):
        qemu_check_clean(str(images / image))
    backup = tmp_path / "b.raw"
    qemu("qemu-img", "convert", "-O", "raw", images / "b.qcow2", backup)
    run("e2fsck", "-fn", backup)
