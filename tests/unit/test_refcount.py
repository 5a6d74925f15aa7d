"""References are real: backends outlive their names, nodes outlive their first parent."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer


async def test_a_deleted_backend_serves_its_references_then_flushes_and_closes(
    tmp_path: Path,
) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    layer = BlockLayer()
    backend = await layer.create("d", str(image))
    backend.ref()  # as an open file does
    events: list[str] = []
    backend.add_listener(lambda b, event: events.append(event))
    await layer.delete("d")
    assert "d" not in layer and events == ["delete"]
    await backend.write(100, b"still here")
    assert await backend.read(100, 10) == b"still here"
    assert layer.graph.nodes  # the tree is open while the reference lives
    await backend.unref()
    assert layer.graph.nodes == {}
    assert image.read_bytes()[100:110] == b"still here"
    with pytest.raises(BlockError) as err:
        await layer.delete("d")
    assert err.value.errno == errno.ENOENT


async def test_a_base_node_shared_by_name(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(b"base" * 16384)
    layer = BlockLayer()
    await layer.create(
        "a", f"driver=raw,node-name=base,read-only=on,file.driver=file,file.filename={image}"
    )
    second = await layer.create("b", "driver=raw,offset=4,read-only=on,file=base")
    base = layer.graph.find("base")
    assert base.refcnt == 2 and len(base.parents) == 2
    assert await second.read(0, 8) == b"basebase"
    with pytest.raises(BlockError) as err:  # read-only: no parent may write it
        await layer.create("c", "driver=raw,file=base,read-only=off")
    assert err.value.errno == errno.EROFS
    await layer.delete("a")
    assert layer.graph.find("base").refcnt == 1
    await layer.delete("b")
    assert layer.graph.nodes == {}


async def test_one_writer_per_node(tmp_path: Path) -> None:
    layer = BlockLayer()
    await layer.create("a", "driver=raw,node-name=shared,file.driver=null")
    nodes = dict(layer.graph.nodes)
    with pytest.raises(BlockError) as err:
        await layer.create("b", "driver=raw,file=shared")
    assert err.value.errno == errno.EBUSY and "already written by" in str(err.value)
    assert layer.graph.nodes == nodes and "b" not in layer
    reader = await layer.create("r", "driver=raw,file=shared,read-only=on")
    assert reader.read_only
    await layer.close()
    assert layer.graph.nodes == {}


async def test_failed_opens_leave_the_graph_as_it_was(tmp_path: Path) -> None:
    layer = BlockLayer()
    await layer.create("a", "driver=null,node-name=n0")
    for options in (
        "driver=raw,node-name=x,file.driver=file,file.filename=/nonexistent",
        "driver=raw,offset=1G,size=1G,file.driver=null,file.size=1M",
        "driver=raw,file=nosuchnode",
        "driver=raw,file.driver=null,file.node-name=n0",
    ):
        with pytest.raises(BlockError):
            await layer.create("b", options)
        assert set(layer.graph.nodes) == {"n0"} and [b.name for b in layer] == ["a"]
    await layer.close()
