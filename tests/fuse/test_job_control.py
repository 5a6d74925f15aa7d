"""Jobs that fail, are cancelled, paused, slowed, or outlived by their daemon: the backend
keeps serving from its original tree and loses nothing; every image stays consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.peers import qemu, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, blkfs, node, wait_until
from tests.jobs import (
    MiB,
    ModelWriter,
    jobs,
    qemu_chain,
    qemu_check_clean,
    status_chain,
    wait_job,
)

pytestmark = [needs_fuse, pytest.mark.fuse, needs_qemu]
SIZE = 32 * MiB


def full_image(images: Path, name: str = "src.qcow2") -> Path:
    """A qcow2 image full of data, so a copy of it takes a while and fills its target."""
    raw = images / "random.raw"
    raw.write_bytes(bytes(range(256)) * (SIZE // 256 // 2) + b"\x5a" * (SIZE // 2))
    image = images / name
    qemu("qemu-img", "convert", "-O", "qcow2", raw, image)
    raw.unlink()
    return image


def tree(mount: Mount) -> dict:
    """The backend's driver tree: its nodes and their options (no counters)."""

    def shape(node: dict) -> dict:
        return {
            "node-name": node["node-name"],
            "driver": node["driver"],
            "options": node["options"],
            "children": {role: shape(child) for role, child in node["children"].items()},
        }

    return shape(mount.backends()["vol"]["tree"])


@pytest.mark.parametrize("where", ["target", "source"])
def test_a_failing_job_says_so_and_leaves_the_backend_serving_its_tree(
    mount_factory, images: Path, where: str
) -> None:
    source = full_image(images)
    target = images / "t.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", target, str(SIZE))
    fail_at = "inject-error.0.event={},inject-error.0.errno={},inject-error.0.offset=4194304"
    if where == "target":  # the target's disk fills up 4 MiB in
        medium = str(source)
        spelled = (
            f"driver=qcow2,file.driver=blkdebug,file.image.driver=file,"
            f"file.image.filename={target},"
            f"file.{fail_at.format('write', 'ENOSPC').replace(',', ',file.')}"
        )
    else:  # the source's disk fails reads 4 MiB in, once the job runs
        medium = (
            f"driver=qcow2,file.driver=blkdebug,file.node-name=disk,"
            f"file.image.driver=file,file.image.filename={source}"
        )
        spelled = f"{target} existing=on"
    mount = mount_factory("--backend", f"vol={medium}")
    with ModelWriter(mount / "vol", SIZE) as writer:
        if where == "source":
            mount.ctl("reopen", "disk " + fail_at.format("read", "EIO"))
        before = tree(mount)
        writer.wrote_more()
        mount.ctl("mirror", f"vol {spelled}")
        job = wait_job(mount, "vol", "concluded")
        assert tree(mount) == before
        writer.wrote_more()
        if where == "source":  # the disk heals, so everything can be read back
            mount.ctl("reopen", "disk inject-error=none")
        writer.agrees()
    expected = "No space left on device" if where == "target" else "Input/output error"
    assert expected in job["error"]
    assert "job vol (mirror on vol) failed" in mount.log.read_text()
    mount.stop()
    qemu_check_clean(str(source))
    qemu_check_clean(str(target))
    assert to_raw(source) == writer.model


def test_a_cancelled_mirror_leaves_the_source_untouched(mount_factory, images: Path) -> None:
    source = full_image(images)
    mount = mount_factory("--backend", f"vol={source}")
    before = tree(mount)
    with ModelWriter(mount / "vol", SIZE) as writer:
        mount.ctl("mirror", f"vol {images / 'm.qcow2'} speed=1M job-id=move")
        wait_job(mount, "move", "running")
        writer.wrote_more()
        mount.ctl("job-cancel", "move")
        job = wait_job(mount, "move", "concluded")
        assert job["error"] == "cancelled"
        assert tree(mount) == before
        writer.wrote_more()
        writer.agrees()
    mount.ctl("job-dismiss", "move")
    assert jobs(mount) == {}
    mount.stop()
    qemu_check_clean(str(source))
    qemu_check_clean(str(images / "m.qcow2"))
    assert to_raw(source) == writer.model


def test_pause_resume_and_speed(mount_factory, images: Path) -> None:
    """The pause comes while a chunk's read is held in blkdebug's delay: that chunk is
    copied, then nothing more, even with the speed limit lifted."""
    source = full_image(images)
    mount = mount_factory(
        "--backend",
        f"vol=driver=qcow2,file.driver=blkdebug,"
        f"file.node-name=dbg,file.image.driver=file,"
        f"file.image.filename={source}",
    )

    def held() -> int:
        return int(node(mount.backends()["vol"]["tree"], "dbg")["info"]["delayed"])

    mount.ctl("backup", f"vol {images / 'b.qcow2'} speed=2M")
    wait_job(mount, "vol", "running")
    mount.ctl("reopen", "dbg delay.read=1s")
    wait_until(lambda: held() > 0, "a chunk's read to be held")
    before = jobs(mount)["vol"]["current-progress"]
    mount.ctl("job-pause", "vol")
    wait_job(mount, "vol", "paused")
    mount.ctl("reopen", "dbg delay.read=0")
    wait_until(
        lambda: jobs(mount)["vol"]["current-progress"] > before,
        "the chunk in flight at the pause to finish",
    )
    paused = jobs(mount)["vol"]["current-progress"]
    assert paused == before + MiB  # one chunk: the one in flight
    mount.ctl("job-set-speed", "vol speed=0")  # a job that ran on would now copy the rest
    assert jobs(mount)["vol"]["current-progress"] == paused < SIZE
    assert jobs(mount)["vol"]["speed"] == 0
    assert "paused" in (mount / ".ctl" / "jobs").read_text()
    mount.ctl("job-resume", "vol")  # no limit: it finishes at once
    job = wait_job(mount, "vol", "running", "concluded")
    job = wait_job(mount, "vol", "concluded")
    assert job["error"] is None and job["current-progress"] == SIZE
    assert mount.ctl_errno("job-pause", "vol") == 22  # concluded: nothing to pause
    assert "has concluded" in mount.last_error()
    mount.stop()
    assert to_raw(images / "b.qcow2") == to_raw(source)


def test_a_stream_onto_an_image_outside_the_chain_is_a_live_safe_rebase(
    mount_factory, images: Path
) -> None:
    base = full_image(images, "base.qcow2")
    top = images / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    other = images / "other.qcow2"  # the base's second half, nothing of its first
    qemu("qemu-img", "create", "-q", "-f", "qcow2", other, str(SIZE))
    qemu("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {SIZE // 2} {SIZE // 2}", other)
    mount = mount_factory(
        "--backend",
        f"vol={top}",
        "--backend",
        f"new=driver=qcow2,node-name=new,read-only=on,file.driver=file,file.filename={other}",
    )
    own = tree(mount)["children"]["file"]["node-name"]
    with ModelWriter(mount / "vol", SIZE) as writer:
        writer.wrote_more()
        assert mount.ctl_errno("stream", f"vol base={own}") == 22
        assert "part of vol's tree" in mount.last_error()
        mount.ctl("stream", "vol base=new")
        job = wait_job(mount, "vol", "concluded")
        assert job["error"] is None, job
        writer.wrote_more()
        writer.agrees()
    assert status_chain(mount, "vol") == [str(top), str(other)]
    mount.stop()
    assert qemu_chain(str(top)) == [str(top), str(other)]
    qemu_check_clean(str(top))
    assert to_raw(top) == writer.model


def test_bad_job_commands_are_refused_and_change_nothing(mount_factory, images: Path) -> None:
    source = full_image(images)
    mount = mount_factory("--backend", f"vol={source}")
    before = tree(mount)
    refused = {
        ("commit", "vol"): "has one image",
        ("stream", "vol"): "has no backing file",
        ("rollback", "vol"): "no backing file to go back to",
        ("mirror", "vol relative.qcow2"): "an absolute path is needed",
        ("mirror", f"vol {source}"): "exists",
        ("mirror", f"vol {images / 'm.qcow2'} sync=sideways"): "sync must be",
        ("snapshot", f"vol {source}"): "exists",
        ("job-complete", "nosuchjob"): "no job named 'nosuchjob'",
        ("commit", "vol base=nosuchnode"): "is not in vol's backing chain",
    }
    for (verb, text), message in refused.items():
        assert mount.ctl_errno(verb, text) != 0, (verb, text)
        assert message in mount.last_error(), (verb, text, mount.last_error())
    assert not (images / "m.qcow2").exists()
    assert tree(mount) == before and jobs(mount) == {}
    mount.ctl("mirror", f"vol {images / 'm.qcow2'} speed=64K")
    assert mount.ctl_errno("backup", f"vol {images / 'b.qcow2'} job-id=other") == 16  # EBUSY
    assert not (images / "b.qcow2").exists()
    for verb, text in (
        ("change", f"vol {source}"),
        ("eject", "vol force=on"),
        ("delete", "vol"),
        ("resize", "vol 64M"),
        ("snapshot", f"vol {images / 's.qcow2'}"),
        ("rollback", "vol"),
    ):
        assert mount.ctl_errno(verb, text) == 16, verb  # the tree is the job's meanwhile
        assert "job 'vol' (mirror) is running on it" in mount.last_error()
    assert mount.backends()["vol"]["tree"]["driver"] == "mirror-top"
    assert mount.ctl_errno("job-complete", "vol") == 22
    assert "not ready yet" in mount.last_error()


def test_a_daemon_stopping_cancels_its_jobs_and_leaves_images_consistent(
    mount_factory, images: Path
) -> None:
    base = full_image(images, "base.qcow2")
    top = images / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    mount = mount_factory("--backend", f"vol={top}")
    with ModelWriter(mount / "vol", SIZE) as writer:
        writer.wrote_more()
    mount.ctl("mirror", f"vol {images / 'm.qcow2'} speed=1M")
    wait_job(mount, "vol", "running")
    blkfs("umount", str(mount.path))
    for image in (top, base, images / "m.qcow2"):
        qemu_check_clean(str(image))
    assert to_raw(top) == writer.model
    assert "cancelled: the daemon is shutting down" in mount.log.read_text()
