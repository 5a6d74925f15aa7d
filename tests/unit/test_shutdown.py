"""A final flush that fails: delete refuses and changes nothing; shutdown still closes
every backend and says which one lost its flush."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

FAILING_FLUSH = (
    "driver=blkdebug,node-name=dbg,inject-error.0.event=flush,"
    "inject-error.0.errno=ENOSPC,image.driver=file,image.filename={image}"
)


async def test_delete_whose_flush_fails_changes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    layer = BlockLayer()
    try:
        backend = await layer.create("d", FAILING_FLUSH.format(image=image))
        await backend.write(0, b"x" * 512)
        with pytest.raises(BlockError) as refused:
            await layer.delete("d")
        assert refused.value.errno == errno.ENOSPC
        assert layer.find("d") is backend and backend.has_medium
        await layer.reopen("dbg", "inject-error=none")
        await layer.delete("d")
        assert "d" not in layer and not layer.graph.nodes
        assert image.read_bytes()[:512] == b"x" * 512
    finally:
        await layer.close()


async def test_shutdown_closes_every_backend_when_one_flush_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = [tmp_path / f"{name}.img" for name in "ab"]
    for image in images:
        image.write_bytes(bytes(65536))
    layer = BlockLayer()
    await layer.create("a", FAILING_FLUSH.format(image=images[0]))
    b = await layer.create("b", f"driver=file,filename={images[1]}")
    await b.write(0, b"y" * 512)
    with caplog.at_level(logging.ERROR):
        await layer.close()
    assert len(layer) == 0 and not layer.graph.nodes
    assert images[1].read_bytes()[:512] == b"y" * 512
    assert any("a: closed, but the final flush failed" in r.getMessage() for r in caplog.records)


async def test_an_eject_whose_flush_fails_leaves_the_medium_serving(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    layer = BlockLayer()
    try:
        backend = await layer.create("d", FAILING_FLUSH.format(image=image))
        await backend.write(0, b"x" * 512)
        with pytest.raises(BlockError) as refused:
            await backend.eject()
        assert refused.value.errno == errno.ENOSPC
        assert backend.has_medium and bytes(await backend.read(0, 512)) == b"x" * 512
        await layer.reopen("dbg", "inject-error=none")
        await backend.eject()
        assert not backend.has_medium and image.read_bytes()[:512] == b"x" * 512
    finally:
        await layer.close()
