"""The layer, not the driver, handles request alignment: read-modify-write around it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blkfs.block import BlockDriver, ChildSpec, Graph, WriteFlags
from blkfs.block.registry import DriverRegistry

ALIGN = 4096


class AlignedDriver(BlockDriver):
    """A real pass-through format that can only address whole 4 KiB blocks, and checks it."""

    name = "aligned"
    children = {"file": ChildSpec()}
    request_alignment = ALIGN

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.requests: list[tuple[str, int, int]] = []
        self.gate: trio.Event | None = None

    def _record(self, kind: str, offset: int, length: int) -> None:
        assert offset % ALIGN == 0 and (length % ALIGN == 0 or offset + length == self.node.size)
        self.requests.append((kind, offset, length))

    async def read(self, offset: int, buf: memoryview) -> None:
        self._record("read", offset, buf.nbytes)
        await trio.sleep(0)  # let concurrent requests interleave
        if self.gate is not None:
            await self.gate.wait()
        await self.child("file").readinto(offset, buf)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        self._record("write", offset, data.nbytes)
        await trio.sleep(0)
        await self.child("file").write(offset, data, flags)

    async def length(self) -> int:
        return self.child("file").node.size


class Registry(DriverRegistry):
    def get(self, name: str) -> type[BlockDriver]:
        return AlignedDriver if name == "aligned" else super().get(name)


@pytest.fixture
async def aligned(tmp_path: Path):
    image = tmp_path / "a.img"
    data = bytearray(os.urandom(16 * ALIGN + 100))  # the last block is partial
    image.write_bytes(data)
    graph = Graph(drivers=Registry())
    node = await graph.open_node(
        {"driver": "aligned", "file": {"driver": "file", "filename": str(image)}}
    )
    yield node, data
    await graph.unref(node)


@pytest.mark.parametrize(
    "offset, length",
    [(1, 10), (ALIGN - 1, 2), (100, 3 * ALIGN), (ALIGN, ALIGN), (16 * ALIGN + 10, 90)],
)
async def test_unaligned_io_is_widened_and_never_reaches_the_driver(
    aligned, offset: int, length: int
) -> None:
    node, model = aligned
    payload = os.urandom(length)
    await node.write(offset, payload)
    model[offset : offset + length] = payload
    start, end = max(0, offset - 3), min(len(model), offset + length + 4)
    buf = bytearray(end - start)
    await node.readinto(start, memoryview(buf))
    assert buf == model[start:end]
    whole = bytearray(len(model))
    await node.readinto(0, memoryview(whole))
    assert whole == model


async def test_concurrent_unaligned_writes_into_one_block_lose_nothing(aligned) -> None:
    node, model = aligned
    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(node.write, 2 * ALIGN + i * 8, bytes([i + 1]) * 8)
    buf = bytearray(ALIGN)
    await node.readinto(2 * ALIGN, memoryview(buf))
    assert buf[:512] == b"".join(bytes([i + 1]) * 8 for i in range(64))
    assert buf[512:] == model[2 * ALIGN + 512 : 3 * ALIGN]


async def test_an_aligned_write_during_a_read_modify_write_is_not_lost(aligned) -> None:
    """An unaligned write reads its block, merges and writes it back; an aligned write to
    that block landing in between must not be overwritten by the stale merge."""
    node, _model = aligned
    driver = node.driver
    driver.gate = trio.Event()  # the read-modify-write's read waits here
    whole = os.urandom(ALIGN)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.write, 100, b"\xee" * 8)
        await trio.testing.wait_all_tasks_blocked()
        assert driver.requests == [("read", 0, ALIGN)]  # stopped between read and write
        nursery.start_soon(node.write, 0, whole)
        await trio.testing.wait_all_tasks_blocked()
        driver.gate.set()
    buf = bytearray(ALIGN)
    await node.readinto(0, memoryview(buf))
    assert bytes(buf) == whole  # the aligned write waited, then won


async def test_a_large_unaligned_write_reads_only_its_edge_blocks(aligned) -> None:
    """The blocks between the edges are written from the caller's buffer as they are: a
    1 MiB write split by the kernel at a user buffer's page offset (fio's buffers sit 16
    bytes into a page) must not read back its whole range."""
    node, model = aligned
    driver = node.driver
    offset, length = 100, 10 * ALIGN
    payload = os.urandom(length)
    await node.write(offset, payload)
    model[offset : offset + length] = payload
    end = offset + length
    assert [r for r in driver.requests if r[0] == "read"] == [
        ("read", 0, ALIGN),
        ("read", end - end % ALIGN, ALIGN),
    ]
    assert sum(n for kind, _, n in driver.requests if kind == "write") == 11 * ALIGN
    whole = bytearray(len(model))
    await node.readinto(0, memoryview(whole))
    assert whole == model
