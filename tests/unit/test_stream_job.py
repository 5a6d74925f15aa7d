"""The stream job in-process: onto a node outside the chain (a safe rebase), what it
refuses and a new base that cannot change or vanish under it; a new speed limit."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from blkfs.errors import BlockError
from blkfs.image import create_image
from blkfs.jobs.manager import JobManager
from blkfs.jobs.stream import stream
from blkfs.layer import BlockLayer

MiB = 1 << 20
SIZE = 4 * MiB


def backing_file(image: Path) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", image],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    return info.get("backing-filename")


async def images(d: Path) -> None:
    """base <- top (top holding its first MiB), and other: a new base to rebase onto."""
    await create_image(str(d / "base.qcow2"), "qcow2", SIZE)
    await create_image(str(d / "top.qcow2"), "qcow2", backing="base.qcow2", backing_format="qcow2")
    await create_image(str(d / "other.qcow2"), "qcow2", SIZE)
    layer = BlockLayer()
    for name, pattern in (("base", 0x11), ("other", 0x77)):
        writer = await layer.create(
            name, f"driver=qcow2,file.driver=file,file.filename={d / (name + '.qcow2')}"
        )
        await writer.write(0, bytes([pattern]) * SIZE)
        await layer.delete(name)
    top = await layer.create("top", str(d / "top.qcow2"))
    await top.write(0, b"\x22" * MiB)
    await layer.close()


def other(d: Path, read_only: bool = True) -> str:
    return (
        f"driver=qcow2,node-name=new,read-only={'on' if read_only else 'off'},"
        f"file.driver=file,file.filename={d / 'other.qcow2'}"
    )


async def test_what_a_rebase_refuses_changes_nothing(tmp_path: Path) -> None:
    await images(tmp_path)
    await create_image(str(tmp_path / "alone.qcow2"), "qcow2", SIZE)
    layer = BlockLayer()
    vol = await layer.create("vol", str(tmp_path / "top.qcow2"))
    alone = await layer.create("alone", str(tmp_path / "alone.qcow2"))
    await layer.create("w", other(tmp_path, read_only=False))
    jobs = JobManager(layer)
    own_file = vol.root_node().children["file"].node.name
    refused = {
        # a standalone image: its zeros are no zero clusters, a new base would show through
        (alone, "new"): (errno.EINVAL, "has no backing file"),
        (vol, "new"): (errno.EINVAL, "must be opened read-only=on"),  # it could change
        (vol, own_file): (errno.EINVAL, "part of vol's tree"),
        (vol, "nosuch"): (errno.EINVAL, "is not in vol's backing chain"),
    }
    for (backend, base), (code, message) in refused.items():
        with pytest.raises(BlockError) as err:
            stream(jobs, backend, None, base, 0)
        assert err.value.errno == code and message in err.value.message, (base, err.value)
    await layer.close()
    assert backing_file(tmp_path / "top.qcow2") == "base.qcow2"


async def test_a_new_backing_file_another_writes_is_refused_before_the_header_changes(
    tmp_path: Path,
) -> None:
    await images(tmp_path)
    layer = BlockLayer()
    vol = await layer.create("vol", str(tmp_path / "top.qcow2"))
    writer = await layer.create("w", other(tmp_path, read_only=False))
    top = vol.root_node()
    base = top.children["backing"].node
    with pytest.raises(BlockError) as err:
        await layer.graph.set_backing(top, writer.root_node(), ("other.qcow2", "qcow2"))
    assert err.value.errno == errno.EBUSY
    assert top.children["backing"].node is base and base.refcnt == 1
    assert writer.root_node().refcnt == 1
    await writer.write(MiB, b"\x99" * 4096)  # not seen through vol
    assert await vol.read(MiB, 4096) == b"\x11" * 4096
    await layer.close()
    assert backing_file(tmp_path / "top.qcow2") == "base.qcow2"


async def test_the_new_base_outlives_its_backend_while_the_job_runs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    await images(tmp_path)
    layer = BlockLayer()
    vol = await layer.create("vol", str(tmp_path / "top.qcow2"))
    new = await layer.create("new", other(tmp_path))
    jobs = JobManager(layer)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.serve)
        job = await jobs.launch(stream(jobs, vol, None, "new", MiB))  # 4 s
        await trio.sleep(1)
        await new.eject(force=True)  # its backend lets go; the job still holds the node
        await job.wait()
        jobs.stop()
    assert job.error is None, job.error
    assert await vol.read(0, SIZE) == b"\x22" * MiB + b"\x11" * (SIZE - MiB)
    await layer.close()
    assert backing_file(tmp_path / "top.qcow2") == "other.qcow2"


async def test_a_new_speed_wakes_a_job_waiting_under_the_old_one(tmp_path: Path) -> None:
    """At 1 byte/s the first chunk means a wait of days; speed=0 ends it at once."""
    await images(tmp_path)
    layer = BlockLayer()
    vol = await layer.create("vol", str(tmp_path / "top.qcow2"))
    jobs = JobManager(layer)
    with trio.fail_after(30):  # a hang guard, not a timing
        async with trio.open_nursery() as nursery:
            await nursery.start(jobs.serve)
            job = await jobs.launch(stream(jobs, vol, None, None, 1))
            while job.done == 0:
                await trio.sleep(0.01)
            job.set_speed(0)
            await job.wait()
            jobs.stop()
    assert job.error is None and job.done == job.total
    await layer.close()
