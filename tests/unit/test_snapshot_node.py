"""snapshot-node (QMP's blockdev-snapshot) racing a snapshot of the same backend: the one
that waited finds the medium changed, and its overlay is left as it was (no backing node,
its header untouched)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import trio.testing

from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.image import create_image
from blkfs.layer import BlockLayer
from tests.unit.test_snapshot_races import SIZE, files, slow_flushing


async def add_overlay(commands: Commands, image: Path) -> None:
    """Node ``ov``: the qcow2 ``image`` with no backing node, for snapshot-node to put on top."""
    options = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": str(image)},
    }
    await commands.run("node-add", {"node": "ov", "options": options})


async def test_a_snapshot_onto_a_node_that_lost_the_race_is_undone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    for name in ("top.qcow2", "ov.qcow2"):
        await create_image(str(tmp_path / name), "qcow2", SIZE)
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "vol", "medium": slow_flushing(tmp_path / "top.qcow2")})
    await add_overlay(commands, tmp_path / "ov.qcow2")
    ov = layer.graph.find("ov")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            commands.run, "snapshot", {"name": "vol", "path": str(tmp_path / "s1.qcow2")}
        )
        await trio.sleep(0.1)  # s1 is flushing the old tree, holding the backend
        with pytest.raises(BlockError) as lost:
            await commands.run("snapshot-node", {"name": "vol", "overlay": "ov"})
    assert lost.value.errno == errno.EBUSY
    assert files(layer.find("vol")) == ["s1.qcow2", "top.qcow2"]
    assert "backing" not in ov.children and ov.driver.info()["backing-filename"] is None
    assert not ov.parents and ov.refcnt == 1

    await commands.run("snapshot-node", {"name": "vol", "overlay": "ov"})
    assert files(layer.find("vol")) == ["ov.qcow2", "s1.qcow2", "top.qcow2"]
    assert ov.driver.info()["backing-filename"] == "s1.qcow2"
    assert await layer.close() == []


async def test_one_overlay_goes_onto_one_backend(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    for name in ("a.qcow2", "b.qcow2", "ov.qcow2"):
        await create_image(str(tmp_path / name), "qcow2", SIZE)
    layer = BlockLayer()
    commands = Commands(layer)
    for name in ("a", "b"):
        await commands.run(
            "create", {"name": name, "medium": slow_flushing(tmp_path / f"{name}.qcow2")}
        )
    await add_overlay(commands, tmp_path / "ov.qcow2")
    refused: list[BlockError] = []

    async def snapshot(name: str) -> None:
        try:
            await commands.run("snapshot-node", {"name": name, "overlay": "ov"})
        except BlockError as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshot, "a")
        nursery.start_soon(snapshot, "b")
    assert [exc.errno for exc in refused] == [errno.EBUSY]
    assert files(layer.find("a"))[0] == "ov.qcow2" or files(layer.find("b"))[0] == "ov.qcow2"
    assert await layer.close() == []


async def test_a_medium_with_no_image_file_is_refused(tmp_path: Path) -> None:
    """A snapshot, or a snapshot onto a node, of a medium with no host file (a null node, as
    an nbd or rbd one) is EINVAL: no header could name it as backing file. The snapshot makes
    no overlay file."""
    await create_image(str(tmp_path / "ov.qcow2"), "qcow2", SIZE)
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "vol", "medium": {"driver": "null", "size": SIZE}})
    await add_overlay(commands, tmp_path / "ov.qcow2")
    for verb, args in (
        ("snapshot", {"path": str(tmp_path / "s1.qcow2")}),
        ("snapshot-node", {"overlay": "ov"}),
    ):
        with pytest.raises(BlockError) as refused:
            await commands.run(verb, {"name": "vol", **args})
        assert refused.value.errno == errno.EINVAL
        assert "vol's medium has no image file" in str(refused.value)
    assert not (tmp_path / "s1.qcow2").exists()
    assert await layer.close() == []
