"""The mount daemon: backends from the configuration, the FUSE session, clean shutdown.

Shutdown (``blkfs umount``, SIGTERM, SIGINT, or an external ``fusermount3 -u``) stops taking
requests, drops the references of still-open files, drains and flushes every backend, and
only then unmounts, so that no acknowledged write is left in a cache.
"""

from __future__ import annotations

import ctypes
import logging
import signal
from dataclasses import dataclass, field
from typing import Callable

import pyfuse3
import trio

from blkfs import fuseops
from blkfs.backend import BlockLayer
from blkfs.control import ControlPlane
from blkfs.fusefs import BlkfsOperations

log = logging.getLogger("blkfs.server")

PR_SET_IO_FLUSHER = 57


@dataclass
class BackendSpec:
    name: str
    options: str | dict | None
    read_only: bool = False


@dataclass
class MountConfig:
    mountpoint: str
    backends: list[BackendSpec] = field(default_factory=list)
    image_dirs: list[str] | None = None
    allow_other: bool = False


def mark_io_flusher() -> None:
    """Ask the kernel not to make us wait on our own writeback under memory pressure (we may
    serve a loop device); needs CAP_SYS_RESOURCE, so failure is only logged."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.debug("PR_SET_IO_FLUSHER not set (errno %d)", ctypes.get_errno())


async def serve(config: MountConfig, ready: Callable[[str | None], None]) -> None:
    """Run the mount until it is unmounted or signalled; ``ready(None)`` once it serves,
    ``ready(message)`` if it could not start (then nothing is left mounted or open)."""
    layer = BlockLayer(config.image_dirs)
    control = ControlPlane(layer)
    try:
        for spec in config.backends:
            await layer.create(spec.name, spec.options, read_only=spec.read_only)
    except Exception as exc:
        await layer.close()
        ready(f"backend '{spec.name}': {exc}")
        return
    ops = BlkfsOperations(layer, control, config.allow_other)
    options = set(pyfuse3.default_options) | {"fsname=blkfs", "subtype=blkfs"}
    if config.allow_other:
        options.add("allow_other")
    try:
        with fuseops.install(fallocate=ops.fallocate, lseek=ops.lseek, spawn=ops.spawn):
            pyfuse3.init(ops, config.mountpoint, options)
    except RuntimeError as exc:
        await layer.close()
        ready(f"cannot mount {config.mountpoint}: {exc}")
        return
    mark_io_flusher()
    log.info("mounted %s with %d backend(s)", config.mountpoint, len(layer))
    try:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            nursery.start_soon(ops.invalidator)
            nursery.start_soon(_stop_on_signal)
            ready(None)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        try:
            with trio.CancelScope(shield=True):
                await ops.release_all()
                await layer.close()
        finally:  # a failed final flush (a full host disk) must not leave a dead mount
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", config.mountpoint)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
