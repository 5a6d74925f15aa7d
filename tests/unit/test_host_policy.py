"""Host files: the image-dir allowlist and QEMU-compatible image locking."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.conftest import needs_qemu


@needs_qemu
async def test_qemu_image_locks_keep_one_writer_per_host_file(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    (tmp_path / "alias.img").symlink_to(image)
    layer = BlockLayer()
    try:
        await layer.create("one", str(image))
        with pytest.raises(BlockError) as err:
            await layer.create("two", str(tmp_path / "alias.img"))
        assert err.value.errno == errno.EBUSY and "in use" in str(err.value)
        assert "two" not in layer
        reader = await layer.create("reader", f"{image},read-only=on")  # readers share
        assert bytes(await reader.read(0, 4)) == b"\0\0\0\0"
        qemu_writer = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 512", str(image)],
            capture_output=True,
            text=True,
        )
        assert qemu_writer.returncode != 0 and "lock" in qemu_writer.stderr
        await layer.delete("one")
        await layer.create("two", str(tmp_path / "alias.img"))
        await layer.delete("two")
        unlocked = await layer.create(
            "forced", f"driver=raw,file.driver=file,file.filename={image},file.locking=off"
        )
        assert not unlocked.read_only
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


async def test_image_dirs_refuse_a_hard_link_to_a_file_outside(tmp_path: Path) -> None:
    """A hard link is indistinguishable from the file it links to, so with an allowlist only
    files with one link are opened."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"host secret" + bytes(4085))
    os.link(secret, allowed / "innocent.img")
    layer = BlockLayer(image_dirs=[str(allowed)])
    try:
        with pytest.raises(BlockError) as err:
            await layer.create("bad", str(allowed / "innocent.img"))
        assert err.value.errno == errno.EACCES and "hard link" in str(err.value)
        assert len(layer) == 0 and not layer.graph.nodes
    finally:
        await layer.close()
    unrestricted = BlockLayer()
    try:  # without an allowlist every file may be opened anyway
        backend = await unrestricted.create("ok", str(allowed / "innocent.img"))
        assert bytes(await backend.read(0, 11)) == b"host secret"
    finally:
        await unrestricted.close()
