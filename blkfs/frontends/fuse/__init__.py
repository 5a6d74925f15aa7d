"""The FUSE frontend: the mount, one file per backend, and ``.ctl/``.

:mod:`~blkfs.frontends.fuse.operations` answers the requests (pyfuse3 handlers);
:mod:`~blkfs.frontends.fuse.compat` holds the patches to pyfuse3 (a faster request loop, the
two operations pyfuse3 does not dispatch: fallocate, lseek). :class:`FuseFrontend` is what
the daemon runs.
"""

from __future__ import annotations

import ctypes
import errno
import logging

import pyfuse3
import trio

from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.ctl import ControlFiles
from blkfs.frontends.fuse.compat import extra_ops
from blkfs.frontends.fuse.compat.session_loop import POLL_MAX_NS
from blkfs.frontends.fuse.operations import BlkfsOperations
from blkfs.layer import BlockLayer

__all__ = ["POLL_MAX_NS", "FuseFrontend"]

log = logging.getLogger("blkfs.fuse")

PR_SET_IO_FLUSHER = 57


def mark_io_flusher() -> None:
    """Ask the kernel not to make us wait on our own writeback under memory pressure (we may
    serve a loop device); needs CAP_SYS_RESOURCE, so failure is only logged."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.debug("PR_SET_IO_FLUSHER not set (errno %d)", ctypes.get_errno())


class FuseFrontend:
    """A FUSE mount serving the layer's backends."""

    name = "fuse"

    def __init__(
        self,
        layer: BlockLayer,
        commands: Commands,
        mountpoint: str,
        allow_other: bool,
        poll_max_ns: int,
    ) -> None:
        self.mountpoint = mountpoint
        self.allow_other = allow_other
        self.ops = BlkfsOperations(layer, ControlFiles(commands), allow_other, poll_max_ns)
        self.mounted = False
        self.stopping = False

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        options = set(pyfuse3.default_options) | {"fsname=blkfs", "subtype=blkfs"}
        if self.allow_other:
            options.add("allow_other")
        try:
            with extra_ops.install(
                fallocate=self.ops.fallocate, lseek=self.ops.lseek, spawn=self.ops.spawn
            ):
                pyfuse3.init(self.ops, self.mountpoint, options)
        except RuntimeError as exc:
            raise BlockError(errno.EIO, f"cannot mount {self.mountpoint}: {exc}") from None
        self.mounted = True
        mark_io_flusher()
        log.info("mounted %s", self.mountpoint)
        try:
            async with trio.open_nursery() as nursery:
                self.ops.nursery = nursery
                nursery.start_soon(self.ops.invalidator)
                task_status.started()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.ops.release_all()

    def stop(self) -> None:
        if self.mounted and not self.stopping:
            self.stopping = True
            pyfuse3.terminate()

    async def close(self) -> None:
        if self.mounted:
            self.mounted = False
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", self.mountpoint)
