"""``rbd``: a node whose data is a Ceph RBD image, as QEMU's rbd driver.

Options are QEMU's: ``pool``, ``namespace``, ``image``, ``snapshot``, ``conf`` (a ceph.conf;
default: librados's usual places), ``user`` (the client id, ``admin`` when unset; its keyring is
found through the conf); and two bounds of blkfs's own: ``open-timeout`` (seconds to reach
the monitors when opening) and ``io-timeout`` (seconds a request may wait for the OSDs before it
fails with EIO; 0, the default, waits as long as librbd does, across OSD restarts).
``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER]`` is the shorthand, as in QEMU.

Data requests go through librbd's asynchronous API and come back to the loop from librbd's
completion thread (see :mod:`.librbd`); librbd's own write-back cache is off, so a write is
answered only when the OSDs acknowledged it (flush is passed on all the same). Connecting,
opening, resizing and ``diff_iterate`` may wait on the cluster, so they run on worker
threads: a cluster that stops answering delays the requests to its images, never the loop.

Ownership across hosts: a writable node takes the image's exclusive lock and keeps it, so a
second writer (another blkfs, QEMU, ``rbd`` with a writing command) is refused with EBUSY
instead of taking turns at the image; read-only nodes and snapshots take no lock and open
beside a writer. A snapshot is always read-only.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from ctypes import c_void_p
from typing import Any

from blkfs.block import BlockDriver, BlockError, Extent, Option, Status, WriteFlags
from blkfs.block.options import REQUIRED
from blkfs.block.workers import HostQueue

from . import librbd

log = logging.getLogger("blkfs.rbd")

CONTROL_CALLS = 4
"""Blocking calls (open, resize, diff_iterate, close) of one node on workers at once."""
MAX_REQUEST = 1 << 30
"""Longest discard or write-zeroes request handed to librbd at once."""
STATUS_SPAN = 1 << 30
"""Longest range one block status call asks ``diff_iterate`` about."""


class RbdDriver(BlockDriver):
    name = "rbd"
    options = {
        "pool": Option("str", REQUIRED, "the pool the image is in"),
        "namespace": Option("str", None, "the namespace in the pool"),
        "image": Option("str", REQUIRED, "the image's name"),
        "snapshot": Option("str", None, "open this snapshot of the image (read-only)"),
        "conf": Option("str", None, "ceph.conf to read (default: librados's usual places)"),
        "user": Option("str", None, "the client id to connect as (default: admin)"),
        "open-timeout": Option(
            "duration", 30, "seconds to keep trying to reach the cluster when opening", minimum=1
        ),
        "io-timeout": Option(
            "duration",
            0,
            "seconds a request may wait for the cluster before it fails with EIO "
            "(0: as long as librbd waits)",
        ),
    }

    @classmethod
    async def create_volume(cls, values: Mapping[str, Any], size: int) -> None:
        """A new image with the cluster's default format and features (``rbd create``)."""
        if values["snapshot"] is not None:
            raise BlockError(errno.EINVAL, f"rbd: {_spec(values)}: a snapshot is not created")
        await HostQueue(1).run(_create, values, size)

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.where = _spec(values)
        self.node.check_rbd_image(self.where)
        _, self._rbd = librbd.libraries()
        self.queue = HostQueue(CONTROL_CALLS)
        self.cluster = await self.queue.run(_connect, values)
        try:
            self.image = await self._open_image(values)
        except BaseException:
            await self.queue.run(self.cluster.close)
            raise
        log.info(
            "rbd: %s: %d bytes, objects of %d, features %#x%s",
            self.where,
            self.size,
            self.object_size,
            self.features,
            "" if self.node.read_only else ", exclusive lock held",
        )

    async def _open_image(self, values: Mapping[str, Any]) -> c_void_p:
        """The image opened as ``values`` say (read-only, or writable holding its lock),
        its facts learnt."""
        read_only = values["read-only"]
        if values["snapshot"] is not None and not read_only:
            raise BlockError(
                errno.EROFS, f"rbd: {self.where} is a snapshot; open it with read-only=on"
            )
        image = await self.queue.run(
            self.cluster.open, values["image"], values["snapshot"], read_only
        )
        try:
            self.features = librbd.features(image)
            self.size = librbd.size(image)
            self.object_size = await self.queue.run(librbd.object_size, image)
            self.fast_diff = bool(self.features & librbd.FEATURE_FAST_DIFF)
            self.snapshots = await self.queue.run(librbd.snapshots, image)
            if not read_only:
                await self._lock(image)
        except BaseException:
            await self.queue.run(librbd.close_image, image)
            raise
        return image

    async def _lock(self, image: c_void_p) -> None:
        if not self.features & librbd.FEATURE_EXCLUSIVE_LOCK:
            log.warning(
                "rbd: %s has no exclusive-lock feature: nothing keeps another client from "
                "writing it at the same time",
                self.where,
            )
            return
        try:
            await self.queue.run(librbd.acquire_exclusive_lock, image)
        except BlockError as exc:
            owners = await self.queue.run(librbd.lock_owners, image)
            held = f" (held by {', '.join(owners)})" if owners else ""
            raise BlockError(
                errno.EBUSY,
                f"rbd: {self.where} is open for writing by another client{held}; "
                f"open it with read-only=on ({exc})",
            ) from None

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """A switch of read-only opens the image anew in the other mode (taking the lock,
        or letting it go with the old handle) before the old handle is closed, so a refused
        switch changes nothing."""
        await super().reopen(values)
        if values["read-only"] != self.node.read_only:
            image = await self._open_image(values)
            old, self.image = self.image, image
            await self.queue.run(librbd.close_image, old)

    async def close(self) -> None:
        await self.queue.run(librbd.close_image, self.image)
        await self.queue.run(self.cluster.close)

    async def _aio(self, start: Callable[[c_void_p], int], what: str) -> int:
        """One asynchronous request; a request the cluster did not answer within
        ``io-timeout`` fails with EIO, as a disk that stopped answering does."""
        try:
            return await librbd.aio(start, what)
        except BlockError as exc:
            if exc.errno != errno.ETIMEDOUT:
                raise
            raise BlockError(
                errno.EIO, f"{what}: no answer from the cluster within io-timeout"
            ) from None

    async def read(self, offset: int, buf: memoryview) -> None:
        pointer, _kept = librbd.address(buf)  # alive until librbd is done with it
        await self._aio(
            lambda c: self._rbd.rbd_aio_read(self.image, offset, buf.nbytes, pointer, c),
            f"rbd: {self.where}: read {offset}+{buf.nbytes}",
        )

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        pointer, _kept = librbd.address(data)  # alive until librbd is done with it
        await self._aio(
            lambda c: self._rbd.rbd_aio_write(self.image, offset, data.nbytes, pointer, c),
            f"rbd: {self.where}: write {offset}+{data.nbytes}",
        )

    async def flush(self) -> None:
        await self._aio(
            lambda c: self._rbd.rbd_aio_flush(self.image, c), f"rbd: {self.where}: flush"
        )

    async def discard(self, offset: int, length: int) -> None:
        for start, count in _pieces(offset, length, MAX_REQUEST):
            await self._aio(
                lambda c: self._rbd.rbd_aio_discard(self.image, start, count, c),  # noqa: B023
                f"rbd: {self.where}: discard {start}+{count}",
            )

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """librbd's write-zeroes, which deallocates whole objects and zeroes the rest:
        a range reads as zeros afterwards either way (thin, as QEMU's rbd driver)."""
        for start, count in _pieces(offset, length, MAX_REQUEST):
            await self._aio(
                lambda c: self._rbd.rbd_aio_write_zeroes(self.image, start, count, c, 0, 0),  # noqa: B023
                f"rbd: {self.where}: write_zeroes {start}+{count}",
            )

    async def length(self) -> int:
        return self.size

    async def truncate(self, length: int) -> None:
        await self.queue.run(librbd.resize, self.image, length)
        self.size = length

    async def block_status(self, offset: int, length: int) -> Extent:
        """Allocated or not, from ``diff_iterate`` (whole objects from the object map where
        the image has fast-diff, as QEMU asks); a hole reads as zeros."""
        length = min(length, STATUS_SPAN)
        start, count = await self.queue.run(
            librbd.first_extent, self.image, offset, length, self.fast_diff
        )
        if start > offset:
            return Extent(start - offset, Status.ZERO)
        return Extent(count, Status.DATA | Status.ALLOCATED)

    def info(self) -> dict[str, Any]:
        return {
            "image": self.where,
            "object-size": self.object_size,
            "features": self.features,
            "snapshots": [{"name": name, "size": size} for name, size in self.snapshots],
            "exclusive-lock": not self.node.read_only
            and bool(self.features & librbd.FEATURE_EXCLUSIVE_LOCK),
        }

    def host_call_ns(self) -> int | None:
        return self.queue.oldest_ns()


def _connect(values: Mapping[str, Any]) -> librbd.Cluster:
    """A connection to the cluster and pool the options name, bounded by their timeouts."""
    settings = {"client_mount_timeout": f"{values['open-timeout']:g}", "rbd_cache": "false"}
    if values["io-timeout"]:
        settings["rados_osd_op_timeout"] = f"{values['io-timeout']:g}"
        settings["rados_mon_op_timeout"] = f"{values['io-timeout']:g}"
    return librbd.Cluster(
        values["conf"], values["user"], values["pool"], values["namespace"], settings
    )


def _create(values: Mapping[str, Any], size: int) -> None:
    cluster = _connect(values)
    try:
        cluster.create(values["image"], size)
    except BlockError as exc:
        if exc.errno == errno.EEXIST:
            raise BlockError(
                errno.EEXIST,
                f"rbd: {_spec(values)} exists; blkfs never overwrites an image (remove it first)",
            ) from None
        raise
    finally:
        cluster.close()


def _spec(values: Mapping[str, Any]) -> str:
    """The image as ``rbd`` names it: POOL[/NAMESPACE]/IMAGE[@SNAP]."""
    namespace = f"{values['namespace']}/" if values["namespace"] else ""
    snapshot = f"@{values['snapshot']}" if values["snapshot"] else ""
    return f"{values['pool']}/{namespace}{values['image']}{snapshot}"


def _pieces(offset: int, length: int, most: int) -> list[tuple[int, int]]:
    return [(s, min(most, offset + length - s)) for s in range(offset, offset + length, most)]
