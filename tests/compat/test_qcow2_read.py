"""Every kind of image qemu-img writes reads through the mount exactly as QEMU reads it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkfs.layer import BlockLayer
from tests.compat.peers import MATRIX, convert, create, make_matrix, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, force_unmount, mounted

pytestmark = [needs_fuse, needs_qemu]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, dict[str, bytes]]]:
    """One mount serving the whole matrix read-only, and QEMU's reading of each image."""
    root = tmp_path_factory.mktemp("qcow2-read")
    images = make_matrix(root / "img")
    expected = {name: to_raw(path) for name, path in images.items()}
    config = root / "blkfs.toml"
    config.write_text(
        "".join(
            f'[backends.{name}]\noptions = "{path}"\nread-only = true\n'
            for name, path in images.items()
        )
    )
    mount = Mount.start(root / "mnt", "--config", str(config), "--image-dir", str(root / "img"))
    try:
        yield mount, expected
    finally:
        mount.stop()
        if mounted(mount.path):
            force_unmount(mount.path)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_cat_equals_qemu_img_convert(matrix: tuple[Mount, dict[str, bytes]], name: str) -> None:
    mount, expected = matrix
    data = subprocess.run(["cat", str(mount / name)], capture_output=True, check=True).stdout
    assert len(data) == len(expected[name])
    assert data == expected[name]


@pytest.mark.parametrize("name", ["zero-kinds-extl2", "subclusters-over-backing", "zlib-c4k"])
def test_unaligned_reads_across_clusters(matrix: tuple[Mount, dict[str, bytes]], name: str) -> None:
    mount, expected = matrix
    data = expected[name]
    with open(mount / name, "rb", buffering=0) as f:
        for offset, length in [
            (1, 511),
            (4095, 2),
            (65535, 65538),
            (131071, 300000),
            (len(data) - 3, 3),
        ]:
            assert os.pread(f.fileno(), length, offset) == data[offset : offset + length]


async def test_a_relative_backing_name_is_relative_to_the_image_behind_a_filter(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = convert(images, "base")
    top = create(images, "top.qcow2", backing=base.name)  # stored as "base.qcow2"
    expected = to_raw(top)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", f"driver=qcow2,file.driver=throttle,file.file.driver=file,file.file.filename={top}"
        )
        assert bytes(await backend.read(0, backend.length())) == expected
    finally:
        await layer.close()


async def test_a_backing_file_resized_on_the_host_is_seen_after_a_refresh(images: Path) -> None:
    """An overlay longer than its backing file reads zeros past the backing file's end; when
    the backing file grows on the host and the backend's size is refreshed (``resize NAME``
    with no size, children first), reads past the old end see what the backing file holds
    now, as QEMU's qcow2 does once its backing node's size is refreshed."""
    base = images / "base.raw"
    base.write_bytes(os.urandom(1 << 20))
    top = images / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top), "4M"],
        check=True,
    )
    layer = BlockLayer()
    try:
        backend = await layer.create("d", str(top))
        assert await backend.read(1 << 20, 4096) == bytes(4096)  # past the backing file's end
        grown = os.urandom(1 << 20)
        with open(base, "ab") as f:
            f.write(grown)
        await backend.refresh_size()
        assert backend.length() == 4 << 20
        now = await backend.read(1 << 20, 1 << 20)
        assert now[:16] == grown[:16] and now == grown  # (a diff of MiBs takes minutes)
        assert await backend.read(2 << 20, 4096) == bytes(4096)
    finally:
        await layer.close()
