"""One conformance suite that every driver setup passes (tests/conformance/setups.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blkfs.backend import BlockBackend
from blkfs.block import Status
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.ceph import needs_ceph
from tests.conformance.setups import SETUPS, SIZE, Setup, initial_data


@pytest.fixture(
    params=[
        pytest.param(s, marks=[needs_ceph, pytest.mark.qemu]) if "ceph" in s.uses else s
        for s in SETUPS
    ],
    ids=lambda s: s.name,
)
def setup(request: pytest.FixtureRequest) -> Setup:
    return request.param


@pytest.fixture
def options(setup: Setup, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The options of a fresh medium of the setup (in the services it uses)."""
    return setup.make(tmp_path, *(request.getfixturevalue(name) for name in setup.uses))


@pytest.fixture
async def medium(
    setup: Setup, options: str, tmp_path: Path
) -> AsyncIterator[tuple[BlockBackend, Setup, Path]]:
    layer = BlockLayer()
    backend = await layer.create("disk", options)
    try:
        yield backend, setup, tmp_path
    finally:
        await layer.close()
    assert layer.graph.nodes == {}


def expected_initial(setup: Setup) -> bytearray:
    return bytearray(initial_data(SIZE) if setup.keeps_data else bytes(SIZE))


async def test_reads_return_the_initial_data(medium) -> None:
    backend, setup, _ = medium
    assert backend.length() == SIZE
    assert await backend.read(0, SIZE) == expected_initial(setup)


async def test_readinto_writes_every_byte_of_a_reused_buffer(medium) -> None:
    """The FUSE frontend reuses reply buffers: stale bytes must never show through."""
    backend, setup, _ = medium
    model = expected_initial(setup)
    buf = bytearray(b"\xa5" * SIZE)
    for offset, length in [(0, SIZE), (1, 4097), (SIZE - 513, 513), (65536, 131072)]:
        view = memoryview(buf)[:length]
        await backend.readinto(offset, view)
        assert view == model[offset : offset + length]


@pytest.mark.parametrize(
    "offset, length",
    [(0, 1), (511, 2), (4095, 4098), (1, SIZE - 2), (SIZE - 7, 7), (65536, 131072)],
)
async def test_unaligned_writes_read_back(medium, offset: int, length: int) -> None:
    backend, setup, _ = medium
    model = expected_initial(setup)
    data = os.urandom(length)
    await backend.write(offset, data)
    if setup.keeps_data:
        model[offset : offset + length] = data
    assert await backend.read(0, SIZE) == model
    assert await backend.read(offset, length) == model[offset : offset + length]


async def test_write_zeroes_and_discard(medium) -> None:
    backend, setup, _ = medium
    model = expected_initial(setup)
    await backend.write_zeroes(1000, 70000)
    model[1000:71000] = bytes(70000)
    assert await backend.read(0, SIZE) == model
    await backend.discard(200000, 8192)
    after = await backend.read(200000, 8192)
    for start in range(200000, 208192, 512):  # discard is data-or-zero, sector by sector
        piece = slice(start - 200000, min(start // 512 * 512 + 512, 208192) - 200000)
        assert after[piece] in (model[200000:208192][piece], bytes(len(after[piece])))


async def test_out_of_range_requests_fail_and_change_nothing(medium) -> None:
    backend, _setup, _ = medium
    before = await backend.read(0, SIZE)
    for request, code in [
        (backend.read(SIZE - 1, 2), errno.EIO),
        (backend.write(SIZE, b"x"), errno.ENOSPC),
        (backend.write(SIZE - 1, b"xy"), errno.ENOSPC),
        (backend.read(-1, 1), errno.EINVAL),
        (backend.write_zeroes(SIZE - 10, 11), errno.ENOSPC),
    ]:
        with pytest.raises(BlockError) as err:
            await request
        assert err.value.errno == code
    assert await backend.read(0, SIZE) == before
    assert backend.stats.errors == 5


async def test_read_only_refuses_writes(setup: Setup, options: str) -> None:
    layer = BlockLayer()
    try:
        if not setup.can_be_read_only:
            with pytest.raises(BlockError) as refused:
                await layer.create("ro", options, read_only=True)
            assert refused.value.errno == errno.EINVAL and "ro" not in layer
            return
        backend = await layer.create("ro", options, read_only=True)
        assert backend.read_only
        for request in (
            backend.write(0, b"x"),
            backend.write_zeroes(0, 10),
            backend.discard(0, 4096),
            backend.truncate(2 * SIZE),
        ):
            with pytest.raises(BlockError) as err:
                await request
            assert err.value.errno == errno.EROFS
        assert await backend.read(0, SIZE) == expected_initial(setup)
    finally:
        await layer.close()


async def test_flush_reaches_the_host_file(medium) -> None:
    backend, setup, tmp = medium
    if setup.host_file is None:
        await backend.flush()
        return
    await backend.write(4096, b"flushed!")
    await backend.flush()
    with open(tmp / setup.host_file, "rb") as f:
        f.seek(setup.host_offset + 4096)
        assert f.read(8) == b"flushed!"


async def test_truncate_where_resizable(medium) -> None:
    backend, setup, _ = medium
    if not setup.resizable:
        with pytest.raises(BlockError) as err:
            await backend.truncate(2 * SIZE)
        assert err.value.errno == errno.ENOTSUP
        assert backend.length() == SIZE
        return
    await backend.truncate(2 * SIZE)
    assert backend.length() == 2 * SIZE
    grown = await backend.read(0, 2 * SIZE)
    assert grown[:SIZE] == expected_initial(setup) and grown[SIZE:] == bytes(SIZE)
    with pytest.raises(BlockError) as err:  # a disk shrinks only when asked to
        await backend.truncate(SIZE // 2)
    assert err.value.errno == errno.EPERM and backend.length() == 2 * SIZE
    if not setup.shrinkable:
        with pytest.raises(BlockError) as err:
            await backend.truncate(SIZE // 2, shrink=True)
        assert err.value.errno == errno.ENOTSUP
        assert backend.length() == 2 * SIZE
        return
    await backend.truncate(SIZE // 2, shrink=True)
    assert backend.length() == SIZE // 2


async def test_block_status_agrees_with_the_data(medium) -> None:
    backend, _setup, _ = medium
    node = backend._medium()  # conformance looks below the backend, at the root node
    await backend.write_zeroes(0, 65536, unmap=True)
    offset = 0
    while offset < SIZE:
        extent = await node.block_status(offset, SIZE - offset)
        assert 0 < extent.length <= SIZE - offset
        if Status.ZERO in extent.status:
            assert await backend.read(offset, extent.length) == bytes(extent.length)
        offset += extent.length
