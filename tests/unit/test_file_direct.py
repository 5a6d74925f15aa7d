"""cache.direct=on: O_DIRECT on the host file, every request aligned by the layer, whatever
the caller asks (unaligned reads and writes, a file whose end is not aligned, growth)."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path

import pytest

from blkfs.block import Node
from blkfs.image import create_image
from blkfs.layer import BlockLayer
from tests.conftest import needs_loop
from tests.helpers import loop_device


def file_node(node: Node) -> Node:
    while node.driver.name != "file":
        node = node.children["file"].node
    return node


async def test_unaligned_requests_through_o_direct_match_a_model(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    model = bytearray(os.urandom(3 * 65536 + 777))  # the end of the file is not aligned
    path.write_bytes(model)
    layer = BlockLayer()
    backend = await layer.create(
        "d", f"driver=raw,file.driver=file,file.cache.direct=on,file.filename={path}"
    )
    node = file_node(backend.root_node())
    flags = fcntl.fcntl(node.driver.fd, fcntl.F_GETFL)  # type: ignore[attr-defined]
    assert flags & os.O_DIRECT
    assert node.request_alignment in (512, 1024, 2048, 4096)
    rng = random.Random(3)
    for _ in range(300):
        offset = rng.randrange(len(model))
        length = rng.randrange(1, min(len(model) - offset, 200_000) + 1)
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            await backend.write(offset, data)
            model[offset : offset + length] = data
        else:
            assert await backend.read(offset, length) == model[offset : offset + length]
    await backend.flush()
    assert path.read_bytes() == model
    await layer.close()


async def test_growth_to_an_unaligned_end_keeps_the_exact_size(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    layer = BlockLayer()
    backend = await layer.create("d", f"driver=file,cache.direct=on,filename={path}")
    await backend.truncate(10_000)
    await backend.write(9_000, b"x" * 1000)
    await backend.write(3, b"abc")
    assert os.path.getsize(path) == 10_000
    assert await backend.read(0, 10_000) == bytes(3) + b"abc" + bytes(8_994) + b"x" * 1000
    await layer.close()
    assert path.read_bytes() == bytes(3) + b"abc" + bytes(8_994) + b"x" * 1000


async def test_a_qcow2_image_and_its_backing_file_both_bypass_the_page_cache(
    tmp_path: Path,
) -> None:
    (tmp_path / "base.img").write_bytes(bytes(range(256)) * 4096)
    await create_image(
        str(tmp_path / "top.qcow2"), "qcow2", backing="base.img", backing_format="raw"
    )
    layer = BlockLayer()
    backend = await layer.create(
        "d",
        f"driver=qcow2,file.driver=file,file.cache.direct=on,"
        f"file.filename={tmp_path / 'top.qcow2'}",
    )
    top = backend.root_node()
    base_file = file_node(top.children["backing"].node)
    assert base_file.values["cache.direct"]
    await backend.write(1000, b"y" * 5000)  # copy-on-write of a partial cluster
    want = bytearray(bytes(range(256)) * 4096)
    want[1000:6000] = b"y" * 5000
    assert await backend.read(0, len(want)) == want
    await layer.close()


@needs_loop
@pytest.mark.loop
@pytest.mark.parametrize("sector", [512, 4096])
async def test_a_block_device_takes_its_logical_block_size_and_unaligned_zeroing(
    tmp_path: Path, sector: int
) -> None:
    """A loop device of 512- or 4096-byte sectors: requests aligned to its sector size
    (a read probe would take 512 on either), and zeroing part of a sector leaves the rest
    of it (the generic zeroing used to pad its last sector with zeros over the data)."""
    backing = tmp_path / "disk.img"
    model = bytearray(os.urandom(1 << 20))
    backing.write_bytes(model)
    with loop_device(backing, sector) as device:
        layer = BlockLayer()
        backend = await layer.create("d", f"driver=file,cache.direct=on,filename={device}")
        assert file_node(backend.root_node()).request_alignment == sector
        for offset, length in ((512, 100), (sector - 7, 9000), (3 * sector, sector)):
            await backend.write_zeroes(offset, length)
            model[offset : offset + length] = bytes(length)
        await backend.write(sector + 3, b"unaligned")
        model[sector + 3 : sector + 12] = b"unaligned"
        assert await backend.read(0, len(model)) == model
        await layer.close()
    assert backing.read_bytes() == model
