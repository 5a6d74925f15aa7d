"""Snapshot and rollback of one backend close together: each acts on the medium as it is
once the backend is drained, never on one it looked at before waiting its turn. A slow
flush of the outgoing tree (blkdebug's delay) holds the first command while the second
starts; trio's clock jumps over the delays."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blkfs.backend import BlockBackend
from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.image import create_image
from blkfs.layer import BlockLayer

SIZE = 4 << 20


def slow_flushing(image: Path) -> dict[str, Any]:
    """The qcow2 image, its flushes taking 300 ms (a busy disk's fdatasync)."""
    return {
        "driver": "qcow2",
        "file": {
            "driver": "blkdebug",
            "delay.flush": "300ms",
            "image": {"driver": "file", "filename": str(image)},
        },
    }


def files(backend: BlockBackend) -> list[str]:
    node = backend.root_node()
    chain = []
    while True:
        image = node.children["file"].node
        chain.append(
            Path(
                image.children["image"].node.filename()
                if "image" in image.children
                else image.filename() or ""
            ).name
        )
        if "backing" not in node.children:
            return chain
        node = node.children["backing"].node


async def test_a_second_snapshot_stacks_on_the_first_or_fails(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    await create_image(str(tmp_path / "top.qcow2"), "qcow2", SIZE)
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "vol", "medium": slow_flushing(tmp_path / "top.qcow2")})
    vol = layer.find("vol")
    refused: list[BlockError] = []

    async def snapshot(name: str) -> None:
        try:
            await commands.run("snapshot", {"name": "vol", "path": str(tmp_path / name)})
        except BlockError as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snapshot, "s1.qcow2")
        await trio.sleep(0.1)  # s1 is flushing the old tree, holding the backend
        nursery.start_soon(snapshot, "s2.qcow2")
        await trio.sleep(0.25)  # s1 is in place
        await vol.write(0, b"\x42" * 4096)  # into s1
    assert await vol.read(0, 4096) == b"\x42" * 4096  # the write did not drop out
    chain = files(vol)
    assert chain[-2:] == ["s1.qcow2", "top.qcow2"], chain
    if refused:  # s2 was made for the medium s1 replaced: it says so and leaves nothing
        assert refused[0].errno == errno.EBUSY and "medium changed" in refused[0].message
        assert not (tmp_path / "s2.qcow2").exists()
    else:
        assert chain == ["s2.qcow2", "s1.qcow2", "top.qcow2"]
    await layer.close()


async def test_a_rollback_waiting_for_a_snapshot_empties_the_new_overlay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    await create_image(str(tmp_path / "base.qcow2"), "qcow2", SIZE)
    await create_image(
        str(tmp_path / "top.qcow2"), "qcow2", backing="base.qcow2", backing_format="qcow2"
    )
    layer = BlockLayer()
    commands = Commands(layer)
    medium = {
        **slow_flushing(tmp_path / "top.qcow2"),
        "backing": {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(tmp_path / "base.qcow2")},
        },
    }
    await commands.run("create", {"name": "vol", "medium": medium})
    vol = layer.find("vol")
    await vol.write(0, b"\x42" * 65536)  # in top: what the snapshot keeps

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            commands.run, "snapshot", {"name": "vol", "path": str(tmp_path / "snap.qcow2")}
        )
        await trio.sleep(0.1)  # the snapshot holds the backend
        await commands.run("rollback", {"name": "vol"})
    assert files(vol) == ["snap.qcow2", "top.qcow2", "base.qcow2"]
    assert await vol.read(0, 65536) == b"\x42" * 65536
    await layer.close()


async def test_a_read_only_active_image_is_not_rolled_back(tmp_path: Path) -> None:
    await create_image(str(tmp_path / "base.qcow2"), "qcow2", SIZE)
    await create_image(
        str(tmp_path / "top.qcow2"), "qcow2", backing="base.qcow2", backing_format="qcow2"
    )
    layer = BlockLayer()
    commands = Commands(layer)
    writer = await layer.create("w", str(tmp_path / "top.qcow2"))
    await writer.write(0, b"\x42" * 65536)
    await layer.delete("w")
    await commands.run("create", {"name": "cd", "medium": f"{tmp_path / 'top.qcow2'},read-only=on"})
    with pytest.raises(BlockError) as refused:
        await commands.run("rollback", {"name": "cd"})
    assert refused.value.errno == errno.EROFS and "read-only" in refused.value.message
    assert await layer.find("cd").read(0, 65536) == b"\x42" * 65536
    await layer.close()
