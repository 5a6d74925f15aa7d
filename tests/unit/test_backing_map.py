"""The backing map (drivers/qcow2/backing_map.py): reads through a chain in one step, and
never a stale one, whatever changes below: a write into a lower layer through another path,
a commit, a stream, a media change, a drain."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from blkfs.backend import BlockBackend
from blkfs.block import Node
from blkfs.image import create_image
from blkfs.jobs.commit import commit
from blkfs.jobs.manager import JobManager
from blkfs.jobs.stream import stream
from blkfs.layer import BlockLayer

CLUSTER = 64 << 10
SIZE = 32 * CLUSTER


def stamp(layer: int, cluster: int) -> bytes:
    """Cluster contents that say which layer wrote them, and which cluster they are."""
    head = f"layer{layer}:cluster{cluster:04d}:".encode()
    return head + bytes([layer + 1]) * (CLUSTER - len(head))


LAYERS = {
    0: range(SIZE // CLUSTER),
    1: range(1, SIZE // CLUSTER, 3),
    2: range(2, SIZE // CLUSTER, 5),
}
"""Which clusters each layer holds: the base all of them, mid and top a few each."""


async def make_chain(d: Path, base_format: str = "qcow2") -> None:
    """base <- mid <- top, each layer holding the clusters LAYERS gives it."""
    layer = BlockLayer()
    if base_format == "raw":
        (d / "base").write_bytes(b"".join(stamp(0, c) for c in LAYERS[0]))
    else:
        await create_image(str(d / "base"), "qcow2", SIZE)
    await create_image(str(d / "mid"), "qcow2", backing="base", backing_format=base_format)
    await create_image(str(d / "top"), "qcow2", backing="mid", backing_format="qcow2")
    for index, name in enumerate(("base", "mid", "top")):
        if name == "base" and base_format == "raw":
            continue
        backend = await layer.create(
            name, f"driver=qcow2,file.driver=file,file.filename={d / name},backing=null"
        )
        for cluster in LAYERS[index]:
            await backend.write(cluster * CLUSTER, stamp(index, cluster))
        await layer.delete(name)
    await layer.close()


def expected(cluster: int, model: dict[int, bytes] | None = None) -> bytes:
    if model is not None and cluster in model:
        return model[cluster]
    top = max(i for i, held in LAYERS.items() if cluster in held)
    return stamp(top, cluster)


def chain_nodes(backend: BlockBackend) -> list[Node]:
    nodes = [backend.root_node()]
    while "backing" in nodes[-1].children:
        nodes.append(nodes[-1].children["backing"].node)
    return nodes


async def check_all(backend: BlockBackend, model: dict[int, bytes] | None = None) -> None:
    for cluster in range(SIZE // CLUSTER):
        data = await backend.read(cluster * CLUSTER, CLUSTER)
        assert data == expected(cluster, model), f"cluster {cluster}"


@pytest.fixture
async def chain(tmp_path: Path) -> Path:
    await make_chain(tmp_path)
    return tmp_path


@pytest.mark.parametrize("base_format", ["qcow2", "raw"])
async def test_reads_through_the_map_are_the_chains_contents(
    tmp_path: Path, base_format: str
) -> None:
    await make_chain(tmp_path, base_format)
    layer = BlockLayer()
    backend = await layer.create("c", str(tmp_path / "top"))
    await check_all(backend)  # the first read of a layer loads its L2 table: learnt later
    await check_all(backend)
    top, _, base = chain_nodes(backend)
    assert len(top.driver.below) == SIZE // CLUSTER - len(LAYERS[2])  # type: ignore[attr-defined]
    rng = random.Random(5)
    base_reads = base.stats.read.ops
    for _ in range(500):  # unaligned, within a cluster and across clusters
        offset = rng.randrange(SIZE - 1)
        length = rng.randrange(1, min(3 * CLUSTER, SIZE - offset) + 1)
        want = b"".join(
            expected(c) for c in range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1)
        )
        start = offset - offset // CLUSTER * CLUSTER
        assert await backend.read(offset, length) == want[start : start + length]
    # reads within one cluster skipped the layers below: only those across clusters came
    assert base.stats.read.ops - base_reads < 500
    await layer.close()


async def test_a_write_into_a_lower_layer_through_another_path_is_seen(chain: Path) -> None:
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    _, mid, base = chain_nodes(backend)
    # the way a commit job's target does: the lower layer made writable, written directly
    await layer.reopen(mid.name, {"read-only": "off"})
    model = {}
    for cluster in (0, 3, 5, 6):  # clusters mid left to the base: allocating writes in mid
        model[cluster] = stamp(7, cluster)
        await mid.write(cluster * CLUSTER, model[cluster])
    await layer.reopen(base.name, {"read-only": "off"})
    for cluster in (8, 9):  # in place in the base: same mapping, new data
        model[cluster] = stamp(8, cluster)
        await base.write(cluster * CLUSTER, model[cluster])
    await base.write_zeroes(11 * CLUSTER, CLUSTER)  # a zero cluster in the base
    model[11] = bytes(CLUSTER)
    await check_all(backend, model)
    await layer.close()


async def test_a_discard_in_a_lower_layer_is_seen(chain: Path) -> None:
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    mid = chain_nodes(backend)[1]
    await layer.reopen(mid.name, {"read-only": "off"})
    await mid.discard(1 * CLUSTER, CLUSTER)  # mid's cluster 1 reads as zeros now
    await check_all(backend, {1: bytes(CLUSTER)})
    await layer.close()


async def run_job(layer: BlockLayer, job_factory: object, *args: object) -> None:
    jobs = JobManager(layer)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.serve)
        job = await jobs.launch(job_factory(jobs, *args))  # type: ignore[operator]
        await job.wait()
        assert job.error is None, job.error
        jobs.stop()


async def test_commit_of_the_middle_layer_keeps_reads_right(chain: Path) -> None:
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    top, mid, base = chain_nodes(backend)
    await run_job(layer, commit, backend, None, mid.name, base.name, 0)
    assert [n.name for n in chain_nodes(backend)] == [top.name, base.name]
    await check_all(backend)
    # the base now holds what mid held: a write into it through another path still shows
    await layer.reopen(base.name, {"read-only": "off"})
    await base.write(6 * CLUSTER, stamp(9, 6))
    await check_all(backend, {6: stamp(9, 6)})
    await layer.close()


async def test_stream_into_the_top_keeps_reads_right(chain: Path) -> None:
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    top = chain_nodes(backend)[0]
    await run_job(layer, stream, backend, None, None, 0)
    nodes = chain_nodes(backend)
    assert [n.name for n in nodes] == [top.name]
    assert len(top.driver.below) == 0  # type: ignore[attr-defined]
    await check_all(backend)
    await layer.close()


async def test_a_media_change_between_chains_reads_the_new_one(chain: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    await make_chain(other)
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    scratch = await layer.create(
        "w", f"driver=qcow2,file.driver=file,file.filename={other / 'mid'},backing=null"
    )
    await scratch.write(0, stamp(6, 0))
    await layer.delete("w")
    await backend.change(str(other / "top"))
    await check_all(backend, {0: stamp(6, 0)})
    await backend.change(str(chain / "top"))
    await check_all(backend)
    await layer.close()


async def test_a_drained_layer_holds_reads_that_would_skip_it(
    chain: Path, autojump_clock: trio.testing.MockClock
) -> None:
    layer = BlockLayer()
    backend = await layer.create("c", str(chain / "top"))
    await check_all(backend)
    mid = chain_nodes(backend)[1]
    done = trio.Event()

    async def read() -> None:
        assert await backend.read(0, 4096) == stamp(0, 0)[:4096]
        done.set()

    async with trio.open_nursery() as nursery:
        async with mid.drained():
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set(), "a read skipped a drained layer"
        await done.wait()
    await layer.close()


async def test_a_drain_waits_for_a_direct_read_in_flight(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The base's image file behind a filter that lags: a read the map sends straight to
    it is in flight there, and a drain of the middle layer, which it skipped, waits."""
    await make_chain(tmp_path)
    layer = BlockLayer()
    base = (
        f"driver=qcow2,node-name=base,file.driver=blkdebug,file.node-name=lag,"
        f"file.image.driver=file,file.image.filename={tmp_path / 'base'}"
    )
    mid = f"driver=qcow2,node-name=mid,file.driver=file,file.filename={tmp_path / 'mid'}"
    await layer.create("b", base + ",read-only=on")
    await layer.create("m", f"{mid},backing=base,read-only=on")
    backend = await layer.create(
        "c", f"driver=qcow2,file.driver=file,file.filename={tmp_path / 'top'},backing=mid"
    )
    await check_all(backend)
    await layer.reopen("lag", {"delay.read": "1s"})
    mid_node = layer.graph.find("mid")
    finished: list[str] = []

    async def read() -> None:
        await backend.read(0, 4096)
        finished.append("read")

    async def drain() -> None:
        async with mid_node.drained():
            finished.append("drain")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert mid_node.in_flight == 1  # admitted at the door it skipped
        nursery.start_soon(drain)
    assert finished == ["read", "drain"]
    await layer.close()
