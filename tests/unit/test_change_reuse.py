"""A media change may take over the outgoing tree's nodes and names: by node name, by an
existing node as the whole medium, or by describing the same image; a change that fails
gives everything back."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    path.write_bytes(b"A" * 65536)
    return path


async def test_a_filter_takes_the_old_tree_and_its_name(image: Path) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=throttle,node-name=thr,limits.iops-total=1000,file.driver=raw,"
            f"file.node-name=r,file.file.driver=file,file.file.filename={image}",
        )
        backend.ref(writer=True)  # a writer: only changes that keep the medium are allowed
        old = layer.graph.find("thr")
        await backend.change("driver=throttle,node-name=thr,limits.iops-total=5000,file=r")
        new = layer.graph.find("thr")
        assert new is not old and new.values["limits.iops-total"] == 5000
        assert old.refcnt == 0 and set(layer.graph.nodes) == {"thr", "r", "#node0"}
        await backend.change("node=r")  # the filter out: the medium is the raw node itself
        assert (await backend.status())["tree"]["node-name"] == "r"
        assert set(layer.graph.nodes) == {"r", "#node0"}
        await backend.write(0, b"still one image")
        assert bytes(await backend.read(0, 15)) == b"still one image"
        await backend.unref(writer=True)
    finally:
        await layer.close()
    assert image.read_bytes()[:15] == b"still one image"


async def test_a_failed_change_gives_the_names_and_locks_back(image: Path, tmp_path: Path) -> None:
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=throttle,node-name=thr,file.driver=raw,file.node-name=r,"
            f"file.file.driver=file,file.file.filename={image}",
        )
        nodes = dict(layer.graph.nodes)
        with pytest.raises(BlockError) as err:
            await backend.change(
                f"driver=throttle,node-name=thr,file.driver=file,"
                f"file.filename={tmp_path / 'missing.img'}"
            )
        assert err.value.errno == errno.ENOENT
        assert layer.graph.nodes == nodes and layer.graph.find("thr") is nodes["thr"]
        with pytest.raises(BlockError) as err:
            await backend.change("node=nosuch")
        assert err.value.errno == errno.ENOENT
        other = BlockLayer()  # the image is locked again for the medium that stayed
        try:
            with pytest.raises(BlockError) as err:
                await other.create("w", str(image))
            assert err.value.errno == errno.EBUSY
        finally:
            await other.close()
        assert bytes(await backend.read(0, 1)) == b"A"
    finally:
        await layer.close()


async def test_node_takes_no_other_options(image: Path) -> None:
    layer = BlockLayer()
    try:
        await layer.create("d", str(image))
        with pytest.raises(BlockError) as err:
            await layer.find("d").change("node=#node1,read-only=on")
        assert err.value.errno == errno.EINVAL and "node=NAME" in str(err.value)
    finally:
        await layer.close()


async def test_under_a_writer_the_medium_may_not_move_down_its_own_tree(tmp_path: Path) -> None:
    """To the backing file (the overlay's writes would vanish) or to the image's file
    node (the guest would write the qcow2 metadata): a change of media, refused (EBUSY)."""
    from blkfs.image import create_image

    await create_image(str(tmp_path / "base.qcow2"), "qcow2", 1 << 20)
    await create_image(
        str(tmp_path / "top.qcow2"), "qcow2", backing="base.qcow2", backing_format="qcow2"
    )
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=qcow2,node-name=top,file.driver=file,file.node-name=top-file,"
            f"file.filename={tmp_path / 'top.qcow2'},backing.driver=qcow2,"
            f"backing.node-name=base,backing.file.driver=file,"
            f"backing.file.filename={tmp_path / 'base.qcow2'}",
        )
        backend.ref(writer=True)
        await backend.write(0, b"in the overlay")
        for node in ("base", "top-file"):
            with pytest.raises(BlockError) as err:
                await backend.change(f"node={node}")
            assert err.value.errno == errno.EBUSY and "writer" in err.value.message, node
        assert (await backend.status())["tree"]["node-name"] == "top"
        assert bytes(await backend.read(0, 14)) == b"in the overlay"
        await backend.unref(writer=True)
    finally:
        await layer.close()
