"""The rbd driver when the cluster misbehaves: an OSD that stops answering delays only the
requests to its images (the daemon's other backends go on), and nothing acknowledged is lost
when it answers again; with ``io-timeout`` such requests fail with EIO instead; a cluster that
cannot be reached fails the open with a clear error within ``open-timeout``."""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.ceph import POOL, Cluster, cluster, free_port, needs_ceph
from tests.compat.peers import MiB
from tests.helpers import wait_until

pytestmark = [needs_ceph, pytest.mark.qemu]
SIZE = 4 * MiB
GUARD = 120
"""Seconds after which a test that should not hang gives up (a bound, not a measurement)."""


@contextmanager
def osd_stopped(ceph: Cluster) -> Iterator[None]:
    """The OSD stopped (SIGSTOP: it keeps its in-memory objects) for the body."""
    osd = ceph.processes["osd.0"]
    osd.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: all_stopped(osd.pid), "every thread of the OSD to stop")
        yield
    finally:
        osd.send_signal(signal.SIGCONT)


def all_stopped(pid: int) -> bool:
    """Whether every thread of the process is stopped (SIGSTOP is delivered to each thread
    on its way back to user space, not at once)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that just ended
            continue
    return all(state in "tT" for state in states)


async def test_a_stopped_osd_delays_only_its_requests_and_loses_nothing(
    ceph: Cluster,
) -> None:
    name = ceph.image(SIZE)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        other = await layer.create("other", f"driver=null,size={SIZE}")
        await backend.write(0, b"before" * 1000)
        await backend.flush()
        written = trio.Event()

        async def write_while_stopped() -> None:
            await backend.write(MiB, b"during" * 1000)
            await backend.flush()
            written.set()

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                with osd_stopped(ceph):
                    nursery.start_soon(write_while_stopped)
                    for _ in range(20):  # the other backend and the loop go on meanwhile
                        assert await other.read(0, 4096) == bytes(4096)
                        await trio.sleep(0.05)
                    assert not written.is_set()  # not acknowledged while the OSD is away
                await written.wait()
            assert await backend.read(0, 6000) == b"before" * 1000
            assert await backend.read(MiB, 6000) == b"during" * 1000
    finally:
        await layer.close()
    exported = ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-")
    assert exported[MiB : MiB + 6000] == b"during" * 1000


async def test_io_timeout_fails_requests_with_eio_while_the_osd_is_away(ceph: Cluster) -> None:
    name = ceph.image(SIZE)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", f"{ceph.spec(name)},io-timeout=2")
        await backend.write(0, b"kept" * 1000)
        await backend.flush()
        with trio.fail_after(GUARD), osd_stopped(ceph):
            with pytest.raises(BlockError) as failed:
                await backend.read(0, 4096)
            assert failed.value.errno == errno.EIO
            assert "io-timeout" in str(failed.value)
        with trio.fail_after(GUARD):
            assert await backend.read(0, 4000) == b"kept" * 1000  # served again afterwards
    finally:
        await layer.close()


async def test_an_unreachable_cluster_fails_the_open_within_open_timeout(
    ceph: Cluster, tmp_path: Path
) -> None:
    conf = tmp_path / "nowhere.conf"
    conf.write_text(
        ceph.conf.read_text().replace(
            next(line for line in ceph.conf.read_text().splitlines() if "mon host" in line),
            f"mon host = v2:127.0.0.1:{free_port()}",
        )
    )
    layer = BlockLayer()
    try:
        with trio.fail_after(GUARD), pytest.raises(BlockError) as failed:
            await layer.create("d", f"rbd:{POOL}/none:conf={conf},open-timeout=2")
        assert failed.value.errno == errno.ETIMEDOUT, failed.value
        assert "cannot connect to the cluster" in str(failed.value)
        assert "d" not in layer
    finally:
        await layer.close()


@pytest.fixture(scope="module")
def ceph_on_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second throwaway cluster whose OSD keeps its objects in bluestore over a sparse
    file, so that it can be killed and restarted without losing them."""
    with cluster(tmp_path_factory.mktemp("ceph-bluestore"), "bluestore") as running:
        yield running


async def test_a_writer_with_fsyncs_loses_nothing_across_an_osd_restart(
    ceph_on_disk: Cluster,
) -> None:
    ceph = ceph_on_disk
    blocks = 256
    name = ceph.image(blocks * 4096)
    acknowledged: list[int] = []
    layer = BlockLayer()
    try:
        backend = await layer.create("d", ceph.spec(name))
        other = await layer.create("other", f"driver=null,size={SIZE}")

        async def writer() -> None:
            for block in range(blocks):
                await backend.write(block * 4096, stamp(block))
                await backend.flush()  # fsync: from here on it must survive
                acknowledged.append(block)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                while len(acknowledged) < blocks // 4:
                    await trio.sleep(0.01)
                ceph.kill_osd()
                held = len(acknowledged)
                for _ in range(10):  # the daemon's other backends are unaffected
                    assert await other.read(0, 4096) == bytes(4096)
                    await trio.sleep(0.05)
                assert len(acknowledged) <= held + 1  # nothing is acknowledged meanwhile
                await trio.to_thread.run_sync(ceph.start_osd)
        assert acknowledged == list(range(blocks))
        data = await backend.read(0, blocks * 4096)
    finally:
        await layer.close()
    expected = b"".join(stamp(block) for block in range(blocks))
    assert data == expected
    assert ceph.run_bytes("rbd", "export", f"{POOL}/{name}", "-") == expected


def stamp(block: int) -> bytes:
    return f"block {block:08d} ".encode().ljust(4096, b"~")
