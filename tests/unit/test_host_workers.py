"""Host calls on worker threads (blkfs.block.workers) and the file driver's ``aio`` option."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import trio

from blkfs.backend import BlockLayer
from blkfs.block.workers import HostQueue
from blkfs.errors import BlockError


async def test_one_nodes_stuck_calls_hold_only_its_own_workers() -> None:
    stuck, other = HostQueue(limit=2), HostQueue(limit=2)
    release = threading.Event()
    started: list[int] = []
    two_started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def hang(index: int) -> int:
        started.append(index)
        if len(started) == 2:
            token.run_sync_soon(two_started.set)
        release.wait()
        return index

    results: list[int] = []

    async def call(index: int) -> None:
        results.append(await stuck.run(hang, index))

    async with trio.open_nursery() as nursery:
        for index in range(5):
            nursery.start_soon(call, index)
        try:
            await two_started.wait()
            assert stuck.running == 2 and stuck.oldest_ns() is not None
            assert await other.run(lambda: "answered") == "answered"  # not behind them
            assert len(started) == 2  # the other three wait their turn
        finally:
            release.set()  # else the nursery would wait for them forever
    assert sorted(results) == [0, 1, 2, 3, 4] and stuck.running == 0
    assert stuck.oldest_ns() is None


async def test_a_failed_call_raises_in_the_caller_and_frees_its_turn() -> None:
    queue = HostQueue(limit=1)

    def fail() -> None:
        raise OSError(errno.EIO, "injected")

    with pytest.raises(OSError, match="injected"):
        await queue.run(fail)
    assert queue.running == 0 and await queue.run(lambda: 7) == 7


async def test_aio_native_is_refused_and_nothing_opens(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(65536))
    layer = BlockLayer()
    with pytest.raises(BlockError) as caught:
        await layer.create("d", f"driver=file,aio=native,filename={path}")
    assert caught.value.errno == errno.EINVAL
    assert "aio=native is not implemented" in caught.value.message
    assert "d" not in layer and not layer.graph.nodes
    backend = await layer.create("d", f"driver=file,aio=threads,filename={path}")
    assert await backend.read(0, 4096) == bytes(4096)
    await layer.close()
