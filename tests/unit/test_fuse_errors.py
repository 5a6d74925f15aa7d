"""What the FUSE handlers raise reaches pyfuse3 as a FUSEError, without a mount: read and
write translate it themselves (no wrapping coroutine on the data path), the other handlers
through :func:`fuse_handler`; a bug is EIO with its traceback in the log."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
import pytest

from blkfs.commands import Commands
from blkfs.frontends.ctl import ControlFiles
from blkfs.frontends.fuse.operations import BlkfsOperations
from blkfs.layer import BlockLayer


async def test_a_bug_in_a_data_path_handler_is_eio_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    layer = BlockLayer()
    ops = BlkfsOperations(layer, ControlFiles(Commands(layer)))
    try:
        await layer.create("d", "driver=null,size=1M")
        inode = (await ops.lookup(pyfuse3.ROOT_INODE, b"d")).st_ino
        fh = (await ops.open(inode, os.O_RDWR, None)).fh  # type: ignore[arg-type]  # unused
        assert await ops.read(fh, 4096, 512) == bytes(512)
        assert await ops.write(fh, 0, b"x" * 512) == 512
        with caplog.at_level(logging.INFO, logger="blkfs.fuse"):
            for call in (ops.read(fh + 1, 0, 512), ops.write(fh + 1, 0, b"x")):
                with pytest.raises(pyfuse3.FUSEError) as raised:
                    await call  # a handle pyfuse3 never had: a KeyError, i.e. a bug
                assert raised.value.errno == errno.EIO
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await ops.write(fh, 1 << 20, b"x")  # past the end: the disk's answer
            assert raised.value.errno == errno.ENOSPC
            with pytest.raises(pyfuse3.FUSEError) as raised:
                await ops.getattr(inode + 1)  # a handler behind fuse_handler
            assert raised.value.errno == errno.ENOENT
        bugs = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert [r.getMessage() for r in bugs] == ["read: internal error", "write: internal error"]
        assert all(r.exc_info and r.exc_info[0] is KeyError for r in bugs)
        assert any(
            "write: " in r.getMessage() and "past the end" in r.getMessage() for r in caplog.records
        )
    finally:
        await ops.release_all()
        await layer.close()
