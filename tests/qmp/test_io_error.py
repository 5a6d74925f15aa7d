"""BLOCK_IO_ERROR: a request the medium fails (a blkdebug rule) is an event to every client;
a request the backend refuses itself (past the end, read-only) is not."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
import trio
from qemu.qmp import QMPClient

from blkfs.backend import IoError
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.conftest import needs_fuse, needs_qemu
from tests.qmp.peer import drive
from tests.qmp.test_monitor import Monitor, qcow2


@needs_fuse
@needs_qemu
@pytest.mark.fuse
def test_failed_requests_are_events(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")
    rules = {
        "inject-error.0.event": "read",
        "inject-error.0.offset": 0,
        "inject-error.0.length": 4096,
        "inject-error.1.event": "write",
        "inject-error.1.errno": "ENOSPC",
        "inject-error.1.offset": 1 << 20,
        "inject-error.1.length": 4096,
        "inject-error.1.once": True,
    }

    async def body(client: QMPClient) -> None:
        await client.execute(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "dbg",
                **rules,
                "image": {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}},
            },
        )
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "dbg", "writable": True}
        )
        fd = os.open(mount / "d", os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as read:
                os.pread(fd, 4096, 0)
            assert read.value.errno == errno.EIO
            event = await client.events.get()
            assert event["event"] == "BLOCK_IO_ERROR"
            assert event["data"] == {
                "device": "d",
                "node-name": "dbg",
                "operation": "read",
                "action": "report",
                "nospace": False,
                "reason": "Input/output error",
            }
            held = asyncio.create_task(  # werror=enospc: held, not failed
                asyncio.to_thread(os.pwrite, fd, b"w" * 4096, 1 << 20)
            )
            try:
                event = await client.events.get()
                assert event["data"] == {
                    "device": "d",
                    "node-name": "dbg",
                    "operation": "write",
                    "action": "stop",
                    "nospace": True,
                    "reason": "No space left on device",
                }
                [block] = await client.execute("query-block")
                assert block["io-status"] == "nospace"
                await client.execute("cont")  # the rule fired once: the retry succeeds
            finally:
                assert await held == 4096
            [block] = await client.execute("query-block")
            assert block["io-status"] == "ok"
            assert os.pread(fd, 4096, 1 << 20) == b"w" * 4096
            assert os.pread(fd, 4096, 8192) == bytes(4096)  # a good request: no event
        finally:
            os.close(fd)
        assert client.events.empty()

    drive(path, body)
    assert mount.alive()


def test_only_the_mediums_failures_are_heard() -> None:
    async def main() -> None:
        layer = BlockLayer()
        heard: list[IoError] = []
        stop = layer.watch_io_errors(heard.append)
        backend = await layer.create(
            "d",
            "driver=blkdebug,node-name=dbg,"
            "inject-error.0.event=flush,"
            "image.driver=null,image.size=1M",
        )
        with pytest.raises(BlockError):
            await backend.read(1 << 20, 1)  # past the end: refused, not failed
        with pytest.raises(BlockError):
            await backend.write(1 << 20, b"x")
        with pytest.raises(BlockError):
            await backend.flush()
        assert heard == [IoError("d", "dbg", "write", errno.EIO, heard[0].message, "report")]
        stop()
        with pytest.raises(BlockError):
            await backend.flush()
        assert len(heard) == 1
        await layer.close()

    trio.run(main)
