"""The nbd driver when its server goes away: qemu-nbd killed (SIGKILL) in the middle of I/O
and started again. Within reconnect-delay, requests wait and are sent again, and no write
that was acknowledged is lost; past it they fail with EIO until the server is back; with no
delay the node fails for good."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.nbdpeers import nbdkit, needs_nbd_tools, qemu_nbd

pytestmark = [needs_nbd_tools, pytest.mark.qemu]
BLOCK, BLOCKS, WORKERS = 4096, 1024, 8


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(BLOCK * BLOCKS))
    return path


async def test_a_server_killed_mid_io_loses_no_acknowledged_write(
    disk: Path, tmp_path: Path
) -> None:
    acknowledged: dict[int, bytes] = {}
    outages = 3
    with qemu_nbd(disk, "raw", tmp_path / "s") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", f"{server.uri},reconnect-delay=20")
            done = trio.Event()

            async def writer(worker: int) -> None:
                rng = random.Random(worker)
                generation = 0
                while not done.is_set():
                    block = worker + WORKERS * rng.randrange(BLOCKS // WORKERS)
                    generation += 1
                    data = f"w{worker}:b{block}:g{generation}:".encode().ljust(BLOCK, b".")
                    await backend.write(block * BLOCK, data)
                    acknowledged[block] = data  # each block has one writer: last ack wins

            async def outage() -> None:
                for _ in range(outages):
                    await trio.sleep(0.4)
                    await trio.to_thread.run_sync(server.kill)
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(server.start)
                await trio.sleep(0.4)
                done.set()

            async with trio.open_nursery() as nursery:
                for worker in range(WORKERS):
                    nursery.start_soon(writer, worker)
                nursery.start_soon(outage)
            await backend.flush()
            info = (await backend.status())["tree"]["info"]
            assert info["reconnects"] == outages and info["connected"]
            for block, data in acknowledged.items():
                assert await backend.read(block * BLOCK, BLOCK) == data
        finally:
            await layer.close()
    image = disk.read_bytes()
    lost = [b for b, data in acknowledged.items() if image[b * BLOCK : (b + 1) * BLOCK] != data]
    assert not lost and len(acknowledged) > 100


async def test_past_the_delay_requests_fail_until_the_server_is_back(
    disk: Path, tmp_path: Path
) -> None:
    with qemu_nbd(disk, "raw", tmp_path / "s") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", f"{server.uri},reconnect-delay=1")
            await backend.write(0, b"a" * BLOCK)
            server.kill()
            start = trio.current_time()
            with pytest.raises(BlockError) as lost:
                await backend.read(0, BLOCK)
            assert lost.value.errno == errno.EIO
            assert 0.9 < trio.current_time() - start < 5
            with pytest.raises(BlockError):  # later requests fail at once
                with trio.fail_after(0.5):
                    await backend.read(0, BLOCK)
            server.start()
            with trio.fail_after(10):
                while True:  # reconnecting goes on in the background
                    try:
                        assert await backend.read(0, BLOCK) == b"a" * BLOCK
                        break
                    except BlockError:
                        await trio.sleep(0.1)
        finally:
            await layer.close()


async def test_without_a_delay_a_lost_server_fails_the_node(disk: Path, tmp_path: Path) -> None:
    with qemu_nbd(disk, "raw", tmp_path / "s") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri)
            server.kill()
            server.start()
            await trio.sleep(0.5)
            with pytest.raises(BlockError) as lost:
                await backend.read(0, BLOCK)
            assert lost.value.errno == errno.EIO and "reconnect-delay=0" in str(lost.value)
            await backend.change(server.uri, force=True)  # a new medium: a new connection
            assert await backend.read(0, BLOCK) == bytes(BLOCK)
        finally:
            await layer.close()


async def test_a_server_that_accepts_and_never_answers_fails_the_request(
    tmp_path: Path,
) -> None:
    """reconnect-delay covers a server that goes away, keepalive a host that vanishes; a
    server that holds the connection open and never replies is request-timeout's."""
    with nbdkit(tmp_path / "s", "--filter=delay", "memory", "size=1M", "delay-read=600") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", f"{server.uri},request-timeout=1")
            await backend.write(0, b"w" * 4096)  # writes are answered at once
            with trio.fail_after(60), pytest.raises(BlockError) as hung:
                await backend.read(0, 4096)
            assert hung.value.errno == errno.EIO
            assert "no reply to READ 0+4096 within 1s (request-timeout)" in hung.value.message
            with pytest.raises(BlockError):  # reconnect-delay=0: the node failed for good
                await backend.write(0, b"x" * 4096)
        finally:
            await layer.close()
