"""The nbd driver against real servers on unix sockets: qemu-nbd serving raw and qcow2 images,
nbdkit's memory, file and sparse-random plugins, and its error and blocksize-policy filters."""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from qemu.qmp import ExecuteError, QMPClient

from blkfs.backend import BlockBackend, Status
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, check, convert, source, to_raw
from tests.conftest import needs_fuse
from tests.helpers import Mount, MountError
from tests.nbdpeers import Extents, nbd_map, nbdkit, needs_nbd_tools, qemu_map, qemu_nbd
from tests.qmp.peer import drive

pytestmark = [needs_nbd_tools, pytest.mark.qemu]
SIZE = 8 * MiB


def image(tmp_path: Path, fmt: str) -> Path:
    """A raw image with data, text, zeros and holes, or its qcow2 conversion (whose zero and
    unallocated clusters qemu-nbd answers with holes)."""
    if fmt == "qcow2":
        return convert(tmp_path, "img", size=SIZE)
    return source(tmp_path / "img.raw", SIZE)


async def extents(backend: BlockBackend) -> Extents:
    """Block status of the whole backend, as qemu-img map says it."""
    runs: Extents = []
    position = 0
    while position < backend.length():
        extent = await backend.block_status(position, backend.length() - position)
        data, zero = Status.DATA in extent.status, Status.ZERO in extent.status
        if runs and runs[-1][2:] == (data, zero):
            runs[-1] = (runs[-1][0], runs[-1][1] + extent.length, data, zero)
        else:
            runs.append((position, extent.length, data, zero))
        position += extent.length
    return runs


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_reads_match_the_image_with_many_requests_in_flight(tmp_path: Path, fmt: str) -> None:
    path = image(tmp_path, fmt)
    expected = to_raw(path)
    with qemu_nbd(path, fmt, tmp_path / "s") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri)
            assert backend.length() == SIZE
            assert await backend.read(0, SIZE) == expected
            rng = random.Random(1)
            ranges = [(rng.randrange(SIZE - 70000), rng.randrange(1, 70000)) for _ in range(200)]
            got: dict[int, bytes] = {}

            async def read(index: int, offset: int, length: int) -> None:
                got[index] = bytes(await backend.read(offset, length))

            async with trio.open_nursery() as nursery:
                for index, (offset, length) in enumerate(ranges):
                    nursery.start_soon(read, index, offset, length)
            assert all(got[i] == expected[o : o + n] for i, (o, n) in enumerate(ranges))
            assert await extents(backend) == qemu_map(path, fmt)
        finally:
            await layer.close()


@pytest.mark.fuse
@needs_fuse
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_compare_through_the_mount(tmp_path: Path, mount_factory, fmt: str) -> None:
    path = image(tmp_path, fmt)
    with qemu_nbd(path, fmt, tmp_path / "s") as server:
        mount: Mount = mount_factory("--backend", f"d={server.uri}")
        result = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", "raw", str(mount / "d"), "-F", fmt, str(path)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "identical" in result.stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_writes_land_and_the_image_checks_clean(tmp_path: Path, fmt: str) -> None:
    path = image(tmp_path, fmt)
    model = bytearray(to_raw(path))
    rng = random.Random(2)
    with qemu_nbd(path, fmt, tmp_path / "s") as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri)
            for _ in range(40):
                offset, data = rng.randrange(SIZE - 200000), rng.randbytes(rng.randrange(1, 200000))
                await backend.write(offset, data, fua=rng.random() < 0.2)
                model[offset : offset + len(data)] = data
            for unmap in (False, True):
                offset, length = rng.randrange(SIZE - MiB), rng.randrange(1, MiB)
                await backend.write_zeroes(offset, length, unmap=unmap)
                model[offset : offset + length] = bytes(length)
            await backend.flush()
            assert await backend.read(0, SIZE) == model
        finally:
            await layer.close()
    if fmt == "qcow2":
        check(path)
    assert to_raw(path) == model


async def test_nbdkit_memory_file_and_sparse_random(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(MiB) + bytes(3 * MiB))
    with (
        nbdkit(tmp_path / "m", "memory", "16M") as memory,
        nbdkit(tmp_path / "f", "file", str(disk)) as file,
        nbdkit(
            tmp_path / "r", "sparse-random", "64M", "seed=7", "percent=30", "runlength=32768"
        ) as sparse,
    ):
        layer = BlockLayer()
        try:
            mem = await layer.create("m", memory.uri)
            await mem.write(4 * MiB + 3, b"hello")
            assert await mem.read(4 * MiB, 8) == b"\0\0\0hello"
            assert await extents(mem) == [
                (0, 4 * MiB, False, True),
                (4 * MiB, 32768, True, False),
                (4 * MiB + 32768, 12 * MiB - 32768, False, True),
            ]
            fil = await layer.create("f", file.uri)
            assert await fil.read(0, 4 * MiB) == disk.read_bytes()
            await fil.write(2 * MiB, b"x" * 1000)
            await fil.flush()
            assert disk.read_bytes()[2 * MiB : 2 * MiB + 1000] == b"x" * 1000
            rnd = await layer.create("r", sparse.uri + ",read-only=on")
            copy = tmp_path / "copy.raw"
            subprocess.run(["nbdcopy", sparse.uri, str(copy)], check=True)
            assert await rnd.read(0, 64 * MiB) == copy.read_bytes()
            runs = await extents(rnd)
            assert len(runs) > 1000 and runs == nbd_map(sparse.uri)
        finally:
            await layer.close()


async def test_server_errors_reach_the_caller_and_the_connection_stays(tmp_path: Path) -> None:
    trigger = tmp_path / "fail"
    with nbdkit(
        tmp_path / "s",
        "--filter=error",
        "memory",
        "16M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        f"error-pread-file={trigger}",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        f"error-pwrite-file={trigger}",
    ) as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri, werror="report")
            await backend.write(0, b"a" * 4096)
            trigger.touch()
            with pytest.raises(BlockError) as read:
                await backend.read(0, 4096)
            assert read.value.errno == errno.EIO
            with pytest.raises(BlockError) as write:
                await backend.write(0, b"b" * 4096)
            assert write.value.errno == errno.ENOSPC
            trigger.unlink()
            assert await backend.read(0, 4096) == b"a" * 4096
            info = (await backend.status())["tree"]["info"]
            assert info["connected"] and info["reconnects"] == 0
        finally:
            await layer.close()


@asynccontextmanager
async def a_cancelled_held_write(
    tmp_path: Path, hold: int, options: str = ""
) -> AsyncIterator[tuple[BlockBackend, str]]:
    """A backend over nbdkit, whose delay filter holds every write ``hold`` seconds under its
    log filter, once a write of 0x11 at 0 was cancelled while the server held it; and what
    the log said when the cancel returned."""
    log = tmp_path / "requests.log"
    with nbdkit(
        tmp_path / "s",
        "--filter=log",
        "--filter=delay",
        "memory",
        "1M",
        f"delay-write={hold}",
        f"logfile={log}",
    ) as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri + options)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.write, 0, b"\x11" * 4096)
                while " Write id=" not in log.read_text():  # sent, and held by the server
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            yield backend, log.read_text()
        finally:
            await layer.close()


async def test_a_cancelled_write_returns_only_once_the_server_has_answered(
    tmp_path: Path,
) -> None:
    """A request sent cannot be taken back: a write abandoned in flight could land after
    what it wrote was reused (a qcow2 frees the clusters of a cancelled allocating write). So
    cancelling a write the server holds returns only after the server's reply, as
    cancelling a host file's write waits for the call."""
    async with a_cancelled_held_write(tmp_path, 2) as (backend, seen):
        assert set(await backend.read(0, 4096)) == {0x11}
    assert " ...Write id=" in seen


async def test_a_cancelled_caller_waits_no_longer_than_the_request_timeout(
    tmp_path: Path,
) -> None:
    """A server that holds a cancelled write past request-timeout (30 s without one) does
    not hold its caller, nor a shutdown, for ever: the connection is given up instead, as
    for a request that timed out (nbdkit then ends the held write without writing)."""
    async with a_cancelled_held_write(tmp_path, 60, ",request-timeout=1") as (backend, seen):
        info = (await backend.status())["tree"]["info"]
    assert not info["connected"]
    assert " ...Write id=1 return=0" not in seen  # given up before the server wrote it


async def test_a_server_with_a_minimum_block_size(tmp_path: Path) -> None:
    """nbdkit refusing requests not aligned to 512 bytes, taking at most 64 KiB at once: the
    layer read-modify-writes, the driver splits and aligns what it sends."""
    with nbdkit(
        tmp_path / "s",
        "--filter=blocksize-policy",
        "memory",
        "4M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ) as server:
        layer = BlockLayer()
        try:
            backend = await layer.create("d", server.uri)
            data = os.urandom(300000)
            await backend.write(1001, data)
            assert await backend.read(1001, len(data)) == data
            await backend.write_zeroes(5000, 3000)
            await backend.discard(100000, 70000)
            got = await backend.read(0, 10000)
            assert got[1001:5000] == data[:3999] and got[5000:8000] == bytes(3000)
            extent = await backend.block_status(3, 100)
            assert extent.length >= 1 and Status.DATA in extent.status
        finally:
            await layer.close()


async def test_refusals_at_open_say_why(tmp_path: Path) -> None:
    path = image(tmp_path, "raw")
    with qemu_nbd(path, "raw", tmp_path / "s", "-r") as server:
        layer = BlockLayer()
        try:
            with pytest.raises(BlockError) as read_only:
                await layer.create("d", server.uri)
            assert read_only.value.errno == errno.EROFS
            assert "read-only=on" in str(read_only.value)
            backend = await layer.create("d", server.uri + ",read-only=on")
            assert backend.read_only
            with pytest.raises(BlockError) as unknown:
                await layer.create("e", f"nbd+unix:///nope?socket={server.socket}")
            assert unknown.value.errno == errno.ENOENT
            assert "the server has: disk0" in str(unknown.value)
            with pytest.raises(BlockError) as missing:
                await layer.create("f", f"nbd+unix:///?socket={tmp_path / 'none'}")
            assert missing.value.errno == errno.ENOENT
            assert "e" not in layer and "f" not in layer
        finally:
            await layer.close()


async def test_open_timeout_waits_for_a_server_that_is_starting(tmp_path: Path) -> None:
    path = image(tmp_path, "raw")
    sock = tmp_path / "late"
    layer = BlockLayer()
    try:
        async with trio.open_nursery() as nursery:

            async def late_server() -> None:
                await trio.sleep(1)
                with qemu_nbd(path, "raw", sock):
                    await trio.sleep(3)

            nursery.start_soon(late_server)
            backend = await layer.create(
                "d", f"nbd+unix:///disk0?socket={sock},open-timeout=10,read-only=on"
            )
            assert await backend.read(0, 4096) == path.read_bytes()[:4096]
            await layer.delete("d")
    finally:
        await layer.close()


@needs_fuse
def test_image_dir_confines_nbd_servers_to_those_allowed(tmp_path: Path, mount_factory) -> None:
    """With --image-dir, an nbd node reaches only a server --allow-nbd names (a socket's
    directory, or HOST:PORT): others are refused with EACCES before any connection, over
    .ctl and QMP alike, and nothing is made. --allow-nbd without --image-dir is refused."""
    inside, sockets = tmp_path / "img", tmp_path / "nbd"
    inside.mkdir()
    sockets.mkdir()
    path = image(tmp_path, "raw")
    with qemu_nbd(path, "raw", sockets / "s") as server:
        medium = f"driver=nbd,server.type=unix,server.path={server.socket},export=disk0"
        tcp = "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=1"
        confined = mount_factory("--image-dir", str(inside), "--qmp", f"unix:{tmp_path / 'm'}")
        for verb, args in (
            ("create", f"d {medium}"),
            ("create", f"d {server.uri}"),
            ("node-add", f"n {medium}"),
            ("create", f"d {tcp}"),
        ):
            assert confined.ctl_errno(verb, args) == errno.EACCES, args
            assert "--allow-nbd" in confined.last_error()
        assert confined.status()["backends"] == [] and confined.status()["nodes"] == []

        async def refused(client: QMPClient) -> None:
            with pytest.raises(ExecuteError) as err:
                await client.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": "n",
                        "export": "disk0",
                        "server": {"type": "unix", "path": str(server.socket)},
                    },
                )
            assert "--allow-nbd" in str(err.value)
            assert await client.execute("query-named-block-nodes") == []

        drive(tmp_path / "m", refused)

        config = tmp_path / "blkfs.toml"  # the config file's list adds to the flags'
        config.write_text(f'image-dirs = ["{inside}"]\nallow-nbd = ["{sockets}"]\n')
        allowed = mount_factory("--config", str(config), "--allow-nbd", "127.0.0.1:1")
        allowed.ctl("create", f"d {medium}")
        assert (allowed / "d").read_bytes() == path.read_bytes()
        allowed.ctl("node-add", f"n {medium}")
        assert allowed.ctl_errno("create", f"e {tcp}") != errno.EACCES  # tried: no server
        assert "127.0.0.1:1" in allowed.last_error() and "--allow" not in allowed.last_error()
        assert allowed.ctl_errno("create", f"e {tcp.replace('port=1', 'port=2')}") == errno.EACCES
        with pytest.raises(MountError, match="only together with --image-dir"):
            mount_factory("--allow-nbd", str(sockets))


async def test_an_nbd_uri_as_a_qcow2_backing_file(tmp_path: Path) -> None:
    """A qcow2 whose header names its backing file by an NBD URI (qemu-img create -b
    nbd+unix://...) opens it as an nbd node, as QEMU does, under the mount's network policy:
    with --image-dir the server must be one --allow-nbd names."""
    inside, sockets = tmp_path / "img", tmp_path / "nbd"
    inside.mkdir()
    sockets.mkdir()
    base = image(tmp_path, "raw")
    before = base.read_bytes()
    with qemu_nbd(base, "raw", sockets / "s") as server:
        top = inside / "top.qcow2"
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", server.uri]
        subprocess.run([*create, str(top), str(SIZE)], check=True)
        confined = BlockLayer([str(inside)])
        try:
            with pytest.raises(BlockError) as refused:
                await confined.create("t", str(top))
            assert refused.value.errno == errno.EACCES and "--allow-nbd" in refused.value.message
        finally:
            await confined.close()
        layer = BlockLayer([str(inside)], [str(sockets)])
        try:
            backend = await layer.create("t", str(top))
            assert await backend.read(0, SIZE) == base.read_bytes()
            await backend.write(MiB, b"overlay" * 100)
            await backend.flush()
        finally:
            await layer.close()
        check(top)
        assert base.read_bytes() == before  # the writes stayed in the overlay
