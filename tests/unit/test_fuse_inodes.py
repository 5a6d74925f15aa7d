"""The FUSE frontend's inode table without a mount: every backend gets its own change
listener and its inode is freed with it, however CPython reuses object addresses."""

from __future__ import annotations

import pyfuse3

from blkfs.commands import Commands
from blkfs.frontends.ctl import ControlFiles
from blkfs.frontends.fuse.operations import BlkfsOperations
from blkfs.layer import BlockLayer


async def test_every_new_backend_is_watched_and_its_inode_freed() -> None:
    layer = BlockLayer()
    ops = BlkfsOperations(layer, ControlFiles(Commands(layer)))
    try:
        for round_ in range(200):  # a freed backend's address comes back for a new one
            backend = await layer.create("d", "driver=null,size=1M")
            await ops.lookup(pyfuse3.ROOT_INODE, b"d")
            assert ops._on_change in backend._listeners, f"round {round_}: not watched"
            await layer.delete("d")
            assert not ops.inodes.backends, f"round {round_}: inode kept"
    finally:
        await layer.close()
