"""Host files: the image-dir allowlist and the one-writer-per-file rule."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blkfs.backend import BlockLayer
from blkfs.errors import BlockError


async def test_a_second_writer_of_one_host_file_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    (tmp_path / "alias.img").symlink_to(image)
    layer = BlockLayer()
    try:
        await layer.create("one", str(image))
        with pytest.raises(BlockError) as err:
            await layer.create("two", str(tmp_path / "alias.img"))
        assert err.value.errno == errno.EBUSY and "already open for writing" in str(err.value)
        assert "two" not in layer
        reader = await layer.create("reader", f"{image},read-only=on")
        assert bytes(await reader.read(0, 4)) == b"\0\0\0\0"
        await layer.delete("one")
        await layer.create("two", str(tmp_path / "alias.img"))  # free again once closed
    finally:
        await layer.close()


async def test_image_dirs_refuse_paths_outside(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.img").write_bytes(bytes(4096))
    (tmp_path / "out.img").write_bytes(bytes(4096))
    (allowed / "escape.img").symlink_to(tmp_path / "out.img")
    layer = BlockLayer(image_dirs=[str(allowed)])
    try:
        await layer.create("ok", str(allowed / "in.img"))
        for path in (tmp_path / "out.img", allowed / "escape.img", allowed / ".." / "out.img"):
            with pytest.raises(BlockError) as err:
                await layer.create("bad", str(path))
            assert err.value.errno == errno.EACCES
        assert [b.name for b in layer] == ["ok"]
        assert len(layer.graph.nodes) == 2
    finally:
        await layer.close()
