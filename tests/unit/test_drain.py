"""Drain is real: a media change under concurrent I/O splits requests cleanly between media."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

BLOCK = 4096
BLOCKS = 64


def stamp(image_id: int, block: int) -> bytes:
    head = f"img{image_id}:blk{block:05d}:".encode()
    return head + bytes([image_id]) * (BLOCK - len(head))


def chunk(block: int) -> bytes:
    return (block + 1).to_bytes(4, "little") * (BLOCK // 4)


def make_image(path: Path, image_id: int) -> None:
    path.write_bytes(b"".join(stamp(image_id, b) for b in range(BLOCKS)))


async def test_every_request_runs_wholly_against_the_old_or_the_new_medium(tmp_path: Path) -> None:
    images = [tmp_path / f"m{i}.img" for i in (1, 2)]
    for i, path in enumerate(images, 1):
        make_image(path, i)
    layer = BlockLayer()
    backend = await layer.create("d", f"{images[0]},read-only=on")
    seen: list[tuple[int, int]] = []
    rng = random.Random(7)

    async def reader() -> None:
        for _ in range(200):
            block = rng.randrange(BLOCKS)
            start = rng.randrange(2)  # half of the reads span two blocks
            data = await backend.read((block - start) % (BLOCKS - 1) * BLOCK, 2 * BLOCK)
            first, second = data[:BLOCK], data[BLOCK:]
            ids = {first[3] - ord("0"), second[3] - ord("0")}
            assert len(ids) == 1, "a request saw two media"
            seen.append((ids.pop(), block))
            await trio.sleep(0)

    async def changer() -> None:
        for i in range(20):
            await trio.sleep(0)
            await backend.change(f"{images[(i + 1) % 2]},read-only=on")

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
        nursery.start_soon(changer)
    assert len(seen) == 8 * 200
    assert {image for image, _ in seen} == {1, 2}
    assert backend.stats.errors == 0
    await layer.close()


async def test_writes_in_flight_land_in_the_medium_they_started_on(tmp_path: Path) -> None:
    images = [tmp_path / f"w{i}.img" for i in (1, 2)]
    for path in images:
        path.write_bytes(bytes(BLOCKS * BLOCK))
    layer = BlockLayer()
    backend = await layer.create("d", str(images[0]))
    acknowledged: set[int] = set()

    async def writer(block: int) -> None:
        await backend.write(block * BLOCK, chunk(block))
        acknowledged.add(block)

    third = BLOCKS // 3
    async with trio.open_nursery() as nursery:
        for block in range(third):  # the first third starts on the old medium
            nursery.start_soon(writer, block)
        while not acknowledged:
            await trio.sleep(0)
        before = set(acknowledged)

        async def change_then_write_the_last_third() -> None:
            await backend.change(str(images[1]))
            for block in range(2 * third, BLOCKS):
                nursery.start_soon(writer, block)

        nursery.start_soon(change_then_write_the_last_third)
        for block in range(third, 2 * third):  # in flight around the change
            nursery.start_soon(writer, block)
    await layer.close()
    contents = [path.read_bytes() for path in images]
    assert acknowledged == set(range(BLOCKS))
    landed = []
    for block in range(BLOCKS):
        where = [
            i
            for i, data in enumerate(contents)
            if data[block * BLOCK : (block + 1) * BLOCK] == chunk(block)
        ]
        assert len(where) == 1, f"block {block} landed in {where}: lost or torn"
        landed.append(where[0])
    assert all(landed[block] == 0 for block in before)
    assert all(landed[block] == 1 for block in range(2 * third, BLOCKS))


async def test_a_failed_change_leaves_the_old_medium_serving(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    make_image(image, 1)
    layer = BlockLayer()
    backend = await layer.create(
        "d", f"driver=raw,node-name=keep,file.driver=file,file.filename={image}"
    )
    await layer.create("o", "driver=null,node-name=elsewhere")  # a name the change may not take
    nodes = set(layer.graph.nodes)
    for options, code in [
        (str(tmp_path / "missing.img"), errno.ENOENT),
        ("driver=raw,offset=zz,file.driver=null", errno.EINVAL),
        ("driver=raw,offset=2G,file.driver=null", errno.EINVAL),
        ("driver=raw,node-name=elsewhere,file.driver=null", errno.EEXIST),
        (
            f"driver=raw,node-name=keep,file.driver=file,file.filename={tmp_path / 'missing.img'}",
            errno.ENOENT,
        ),
    ]:
        with pytest.raises(BlockError) as err:
            await backend.change(options)
        assert err.value.errno == code
        assert set(layer.graph.nodes) == nodes
        assert await backend.read(0, BLOCK) == stamp(1, 0)
    await layer.close()


async def test_eject_and_insert(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    make_image(image, 1)
    layer = BlockLayer()
    backend = await layer.create("cd", str(image))
    await backend.eject()
    assert backend.length() == 0 and not backend.has_medium
    for request in (backend.read(0, 1), backend.write(0, b"x"), backend.eject()):
        with pytest.raises(BlockError) as err:
            await request
        assert err.value.errno == errno.ENOMEDIUM
    assert layer.graph.nodes == {}
    await backend.insert(str(image))
    with pytest.raises(BlockError) as err:
        await backend.insert(str(image))
    assert err.value.errno == errno.EBUSY
    assert await backend.read(0, BLOCK) == stamp(1, 0)
    await layer.close()


async def test_two_drains_of_one_node_both_end(tmp_path: Path) -> None:
    """A second drain while the first waits for a request in flight: both go on once it
    ends (the second used to take the first's wake-up, which then waited for ever)."""
    path = tmp_path / "a.img"
    make_image(path, 1)
    layer = BlockLayer()
    backend = await layer.create(
        "d", f"driver=blkdebug,delay.read=1s,image.driver=file,image.filename={path}"
    )
    node = backend.root_node()
    drained: list[str] = []

    async def drain(who: str) -> None:
        async with node.drained():
            drained.append(who)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.read, 0, BLOCK)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(drain, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(drain, "second")
    assert sorted(drained) == ["first", "second"]
    await layer.close()
