"""Drivers come from entry points; probing picks formats; a probed raw image cannot be turned
into another format by what is written into it."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import pytest

from blkfs.block.registry import DriverRegistry
from blkfs.errors import BlockError, OptionError
from blkfs.layer import BlockLayer

QCOW2_MAGIC = b"QFI\xfb"


def test_our_drivers_are_entry_points() -> None:
    registry = DriverRegistry()
    assert {"file", "raw", "null"} <= set(registry.names())
    assert registry.get("raw").name == "raw"
    with pytest.raises(OptionError) as err:
        registry.get("nosuch")
    assert "known: " in str(err.value) and "raw" in str(err.value)


def test_a_third_party_driver_plugs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that declares a blkfs.drivers entry point is found with no change here."""
    (tmp_path / "zerodrv.py").write_text(
        "from blkfs_drivers.null import NullDriver\n"
        "class ZeroDriver(NullDriver):\n    name = 'zero'\n"
    )
    dist = tmp_path / "zerodrv-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zerodrv\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[blkfs.drivers]\nzero = zerodrv:ZeroDriver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = DriverRegistry()
    assert registry.get("zero").name == "zero"
    monkeypatch.delitem(sys.modules, "zerodrv", raising=False)


EVIL_HEADER = (
    QCOW2_MAGIC
    + b"\0\0\0\3"
    + (100).to_bytes(8, "big")
    + (20).to_bytes(4, "big")
    + b"/etc/shadow" * 2
)
"""A qcow2 header naming a backing file of a guest's choosing."""


@pytest.mark.parametrize(
    "offset, data",
    [
        (0, EVIL_HEADER + bytes(512 - len(EVIL_HEADER))),  # a whole sector
        (0, EVIL_HEADER),  # a partial one: read-modify-write
        (0, EVIL_HEADER + bytes(65536)),  # and on into the disk
    ],
)
async def test_a_probed_raw_image_refuses_a_first_sector_of_another_format(
    tmp_path: Path, offset: int, data: bytes
) -> None:
    image = tmp_path / "guest.img"
    image.write_bytes(b"\1" * (1 << 20))
    layer = BlockLayer()
    try:
        disk = await layer.create("d", str(image))
        assert (await disk.status())["tree"]["driver"] == "raw"
        with pytest.raises(BlockError) as refused:
            await disk.write(offset, data)
        assert refused.value.errno == errno.EPERM and "driver=raw" in str(refused.value)
        assert image.read_bytes() == b"\1" * (1 << 20)
        await disk.write(0, b"plain boot sector" + bytes(1000))  # other data is fine
        await disk.write(100, QCOW2_MAGIC)  # the magic elsewhere in the sector is, too
        await disk.eject()
        await disk.insert(str(image))
        assert (await disk.status())["tree"]["driver"] == "raw"
    finally:
        await layer.close()


async def test_a_named_raw_image_takes_any_first_sector(tmp_path: Path) -> None:
    image = tmp_path / "guest.img"
    image.write_bytes(bytes(1 << 20))
    layer = BlockLayer()
    try:
        disk = await layer.create("d", f"driver=raw,file.driver=file,file.filename={image}")
        await disk.write(0, EVIL_HEADER)
        assert bytes(await disk.read(0, 4)) == QCOW2_MAGIC
    finally:
        await layer.close()


async def test_probe_needs_a_file_and_rejects_format_options(tmp_path: Path) -> None:
    layer = BlockLayer()
    for options in ('{"offset": 5}', '{"read-only": true}'):
        with pytest.raises(BlockError) as err:
            await layer.create("d", options)
        assert err.value.errno == errno.EINVAL
    with pytest.raises(OptionError) as err:
        await layer.create("d", f"{tmp_path}/x.img,offset=5")
    assert "explicit driver" in str(err.value)
    assert layer.graph.nodes == {}


async def test_a_mistyped_option_after_a_path_is_unknown_with_the_close_match(
    tmp_path: Path,
) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(4096))
    layer = BlockLayer()
    with pytest.raises(OptionError) as err:
        await layer.create("d", f"{image},read-onyl=on")
    assert "unknown option 'read-onyl' (did you mean 'read-only'?" in str(err.value)
    assert layer.graph.nodes == {} and len(layer) == 0
