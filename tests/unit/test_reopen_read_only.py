"""read-only on and off through reopen: the node and the children it writes through switch
together, host descriptors and QEMU image locks follow, and a refused switch changes nothing.
qemu-io is the peer that sees the locks."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import create
from tests.conftest import needs_qemu
from tests.locks import lock_bytes

MiB = 1 << 20


def qemu_io_write(image: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 7 0 4k", str(image)], capture_output=True, text=True
    )


def node_modes(layer: BlockLayer) -> dict[str, bool]:
    return {name: node.read_only for name, node in layer.graph.nodes.items()}


@needs_qemu
async def test_a_raw_medium_switches_and_its_lock_follows(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=raw,node-name=top,file.driver=file,file.node-name=host,file.filename={image}",
        )
        await backend.write(0, b"A" * 4096)
        assert "lock" in qemu_io_write(image, "raw").stderr  # blkfs holds the write lock

        await layer.reopen("top", "read-only=on")
        assert backend.read_only and node_modes(layer) == {"top": True, "host": True}
        with pytest.raises(BlockError) as refused:
            await backend.write(0, b"B")
        assert refused.value.errno == errno.EROFS
        assert image.read_bytes()[:4096] == b"A" * 4096  # flushed before switching
        assert qemu_io_write(image, "raw").returncode == 0  # the lock is shared now
        assert bytes(await backend.read(0, 4096)) == b"\x07" * 4096

        await layer.reopen("top", "read-only=off")
        assert not backend.read_only and node_modes(layer) == {"top": False, "host": False}
        await backend.write(4096, b"C" * 4096)
        await backend.flush()
        assert image.read_bytes()[4096:8192] == b"C" * 4096
        assert "lock" in qemu_io_write(image, "raw").stderr
    finally:
        await layer.close()


@needs_qemu
async def test_a_filter_over_qcow2_switches_its_whole_write_path_not_the_backing(
    tmp_path: Path,
) -> None:
    base = create(tmp_path, "base.qcow2", size=4 * MiB)
    top = create(tmp_path, "top.qcow2", size=4 * MiB, backing=str(base))
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=throttle,node-name=t,file.driver=qcow2,file.node-name=q,"
            f"file.file.driver=file,file.file.node-name=f,file.file.filename={top}",
        )
        backing = {name for name, ro in node_modes(layer).items() if ro}
        assert len(backing) == 2  # the backing qcow2 and its file, read-only from the start
        await backend.write(0, b"x" * 65536)

        with pytest.raises(BlockError) as busy:
            await layer.reopen("q", "read-only=on")  # the throttle node still writes to it
        assert busy.value.errno == errno.EBUSY and "'t'" in busy.value.message
        assert not any(node_modes(layer)[name] for name in ("t", "q", "f"))

        await layer.reopen("t", "read-only=on")
        assert all(node_modes(layer).values()) and backend.read_only
        check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout  # metadata written back before the switch

        await layer.reopen("t", "read-only=off")
        assert {name for name, ro in node_modes(layer).items() if ro} == backing
        await backend.write(65536, b"y" * 65536)
        assert bytes(await backend.read(0, 131072)) == b"x" * 65536 + b"y" * 65536
    finally:
        await layer.close()


@needs_qemu
async def test_a_refused_switch_to_writable_rolls_back_every_node(tmp_path: Path) -> None:
    image = create(tmp_path, "dirty.qcow2", size=4 * MiB)
    with image.open("r+b") as header:  # incompatible feature bit 0: dirty
        header.seek(72)
        header.write((1).to_bytes(8, "big"))
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=qcow2,node-name=q,file.driver=file,file.node-name=f,file.filename={image}",
            read_only=True,
        )
        with pytest.raises(BlockError) as refused:
            await layer.reopen("q", "read-only=off")
        assert refused.value.errno == errno.EROFS and "not closed cleanly" in refused.value.message
        assert node_modes(layer) == {"q": True, "f": True} and backend.read_only
        assert bytes(await backend.read(0, 512)) == bytes(512)
        # the write lock taken for the switch was given back: the locks of a read-only qcow2
        assert lock_bytes(image) == ({"consistent read"}, {"write", "resize"})
    finally:
        await layer.close()


@needs_qemu
async def test_a_node_becomes_writable_only_if_nothing_else_uses_what_it_writes(
    tmp_path: Path,
) -> None:
    image = create(tmp_path, "d.qcow2", size=4 * MiB)
    layer = BlockLayer()
    try:
        await layer.create("raw", f"driver=file,node-name=f0,filename={image},read-only=on")
        backend = await layer.create("q", "driver=qcow2,node-name=q,file=f0", read_only=True)
        with pytest.raises(BlockError) as busy:
            await layer.reopen("q", "read-only=off")  # f0 is read by backend 'raw' too
        assert busy.value.errno == errno.EBUSY and "'raw'" in busy.value.message
        assert backend.read_only and node_modes(layer) == {"f0": True, "q": True}
        with pytest.raises(BlockError) as busy:  # a read-only qcow2 lets nobody write f0
            await layer.create("w", "driver=raw,file=f0")
        assert busy.value.errno in (errno.EBUSY, errno.EROFS)
    finally:
        await layer.close()


@needs_qemu
async def test_turning_writable_reloads_what_another_program_wrote_meanwhile(
    tmp_path: Path,
) -> None:
    image = create(tmp_path, "d.qcow2", size=4 * MiB)
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d", f"driver=qcow2,node-name=q,file.driver=file,file.filename={image}", read_only=True
        )
        assert "lock" in qemu_io_write(image, "qcow2").stderr  # a read-only qcow2 unshares
        await layer.delete("d")  # writes, as QEMU's; without locks, another program can:
        backend = await layer.create(
            "d",
            f"driver=qcow2,node-name=q,file.driver=file,file.locking=off,file.filename={image}",
            read_only=True,
        )
        assert bytes(await backend.read(0, 4096)) == bytes(4096)  # L2 state cached here
        assert qemu_io_write(image, "qcow2").returncode == 0  # allocates while we read
        await layer.reopen("q", "read-only=off")
        assert bytes(await backend.read(0, 4096)) == b"\x07" * 4096
        await backend.write(1 << 20, b"z" * 65536)
        await backend.flush()
    finally:
        await layer.close()
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    data = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 7 0 4k", "-c", "read -P 0x7a 1M 64k", str(image)],
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in data.stdout and data.returncode == 0
