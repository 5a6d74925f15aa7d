"""The request path of a backend (the data path of :class:`~blkfs.backend.BlockBackend`).

Every request is checked once (medium present, range, read-only state), counted for drain
and statistics, and handed to the medium's root node. A request the medium fails goes to the
backend's error policy (:mod:`blkfs.error_policy`): reported, ignored, or held until
``cont`` retries it; the layer's I/O error listeners hear of each.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING

from blkfs.block.dirty import check_usable, find_below
from blkfs.block.driver import Extent, WriteFlags
from blkfs.block.node import Child, Node
from blkfs.block.request import Requests
from blkfs.error_policy import Action, Operation, Pause, Policy, action
from blkfs.errors import BlockError, LastingError

if TYPE_CHECKING:
    from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.backend")

MAX_TRANSFER = 32 << 20
"""The largest request a frontend should send (as QEMU's BDRV_REQUEST_MAX_BYTES bounds
them); larger ones work, but hold a buffer of that size."""


@dataclass(frozen=True)
class IoError:
    """A request the medium failed (QEMU's BLOCK_IO_ERROR): not a request the backend
    refused (out of range, read-only, no medium), which is the caller's fault."""

    backend: str
    node: str
    """The medium's root node."""
    operation: Operation
    """Flushes, discards and zeroing are writes, as QEMU reports them."""
    errno: int
    message: str
    action: Action
    """What the backend's error policy made of it (see :mod:`blkfs.error_policy`)."""


IoErrorListener = Callable[[IoError], None]


@dataclass(frozen=True)
class Limits:
    """Request limits of a medium, as a server tells its clients (NBD's block sizes)."""

    request_alignment: int
    """Smaller or unaligned requests are read-modify-written."""
    max_transfer: int
    discard_granularity: int
    """Smallest unit a discard frees."""


class BackendIO:
    """The request path of a backend: reads, writes, flushes, discards, zeroing, block
    status, and the error policy's pause."""

    name: str
    layer: BlockLayer
    _root: Child | None
    _read_only: bool

    def __init__(self, werror: Policy, rerror: Policy) -> None:
        self._requests = Requests()
        self.stats = self._requests.stats
        self.werror: Policy = werror
        self.rerror: Policy = rerror
        self._pause: Pause | None = None
        """Set while the error policy holds requests (see :mod:`blkfs.error_policy`)."""
        self.changed_ns = time.time_ns()
        """When the medium, its size or its contents last changed (for mtime)."""

    @property
    def read_only(self) -> bool:
        """True if writes are refused: the backend's switch, or a read-only medium."""
        return self._read_only or (self._root is not None and not self._root.can_write)

    def _medium(self) -> Node:
        if self._root is None:
            raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium")
        return self._root.node

    def _report(
        self, node: Node, operation: Operation, exc: BlockError, what: Action = "report"
    ) -> None:
        """Tell the layer's I/O error listeners that ``node`` failed a request. (Callers
        catch the error themselves: a context manager around every request would cost a
        third of a 4 KiB read's instructions.)"""
        error = IoError(self.name, node.name, operation, exc.errno, exc.message, what)
        for listener in list(self.layer.io_error_listeners):
            listener(error)

    async def _failed(
        self, node: Node, operation: Operation, offset: int | None, exc: BlockError
    ) -> bool:
        """Apply the error policy to a request ``node`` failed: raise ``exc`` (report),
        return False (ignore: the request counts as done), or hold the request until
        :meth:`cont` and return True (retry it). The first failure pauses the backend: new
        requests wait at the door until then. (Each request path writes its retry loop out:
        a coroutine wrapped around every request would cost the instructions the callgrind
        guard counts.)"""
        what = (
            "report"
            if isinstance(exc, LastingError)
            else action(self.werror if operation == "write" else self.rerror, exc.errno)
        )
        self._report(node, operation, exc, what)
        if what == "report":
            raise exc
        if what == "ignore":
            return False
        pause = self._pause
        if pause is None:
            pause = self._pause = Pause(operation, node.name, offset, exc.errno, exc.message)
            self._requests.tracker.hold()
            log.warning("%s: %s; held until 'cont %s'", self.name, pause.describe(), self.name)
        await pause.over.wait()
        if pause.abandoned:
            raise BlockError(
                errno.EIO, f"{self.name}: {pause.describe()}; given up with force=on"
            ) from exc
        return True

    @property
    def paused(self) -> bool:
        return self._pause is not None

    def cont(self) -> None:
        """Retry the requests a pause holds, and let the waiting ones in (QEMU's cont); if
        they fail again, the backend pauses again. Nothing happens to a backend that is not
        paused."""
        if self._pause is not None:
            self._end_pause(abandon=False)
            log.info("%s: resumed", self.name)

    def _end_pause(self, abandon: bool) -> None:
        pause, self._pause = self._pause, None
        assert pause is not None
        pause.abandoned = abandon
        self._requests.tracker.release()
        pause.over.set()
        if abandon:
            log.warning("%s: pause given up (force=on): its held requests fail with EIO", self.name)

    def _check_range(self, node: Node, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0:
            raise BlockError(errno.EINVAL, f"{self.name}: negative offset or length")
        if offset + length > node.size:
            raise BlockError(
                errno.ENOSPC if write else errno.EIO,
                f"{self.name}: {offset}+{length} is past the end ({node.size})",
            )

    def _check_write(self, node: Node, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.name}: read-only medium")
        self._check_range(node, offset, length, write=True)

    async def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes at ``offset``; the whole range must lie within the medium."""
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return buf

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (every byte is written, so a reused
        buffer needs no clearing); the whole range must lie within the medium.

        The path's first step is the short path (:meth:`Node.read_now`), taken before the
        request's coroutines are made (they were a seventh of a 4 KiB read's instructions):
        nothing awaits in it, so no drain can begin while it runs and the request is counted
        in the statistics only. What it does not serve (the backend drained or paused, no
        medium, out of range, data not at hand, an error) goes the whole way, which tells
        the refusal or applies the error policy."""
        root = self._root
        tried = False
        if root is not None and not self._requests.tracker.quiesced:
            node = root.node
            length = buf.nbytes
            if offset >= 0 and offset + length <= node.size:
                start = perf_counter_ns()
                tried = True
                try:
                    done = node.read_now(offset, buf)
                except BlockError:  # the whole way meets it again
                    done = False
                if done:
                    self.stats.read.add(length, perf_counter_ns() - start)
                    return
        await self._requests.run(self.stats.read, buf.nbytes, self._readinto, offset, buf, tried)

    async def _readinto(self, offset: int, buf: memoryview, tried: bool) -> None:
        """The rest of the way; ``tried``: the short path has just been tried (nothing
        awaited since), so the first attempt skips it."""
        node = self._medium()
        self._check_range(node, offset, buf.nbytes, write=False)
        while True:
            try:
                if tried or not node.read_now(offset, buf):
                    await node.readinto(offset, buf)
                return
            except BlockError as exc:
                if not await self._failed(node, "read", offset, exc):
                    return
            tried = False

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> Awaitable[None]:
        """Write all of ``data`` at ``offset``; past the end is ENOSPC, as on a disk. With
        ``fua`` (NBD's force unit access), the write is durable when this returns. (It hands
        back the request's coroutine rather than await it in one of its own: a coroutine
        less per write.)"""
        flags = WriteFlags.FUA if fua else WriteFlags.NONE
        return self._requests.run(self.stats.write, len(data), self._write, offset, data, flags)

    async def _write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        node = self._medium()
        self._check_write(node, offset, len(data))
        while True:
            try:
                await node.write(offset, data, flags)
                break
            except BlockError as exc:
                if not await self._failed(node, "write", offset, exc):
                    return
        self.changed_ns = time.time_ns()

    async def flush(self) -> None:
        """Make every acknowledged write durable in the host files."""
        await self._requests.run(self.stats.flush, 0, self._flush)

    async def _flush(self) -> None:
        """A flush that failed on the host (fsyncgate) is reported whatever the error policy:
        it stays failed until the medium is reopened, so retrying it would not help. One
        that failed before (metadata that did not fit on a full host) is held as a write."""
        if self._root is not None:
            node = self._root.node
            while True:
                try:
                    await node.flush()
                    return
                except BlockError as exc:
                    if not await self._failed(node, "write", None, exc):
                        return

    async def discard(self, offset: int, length: int) -> None:
        """Tell the medium the range is unused (advisory: it may read as before or as
        zeros afterwards); it may give the space back."""
        await self._requests.run(
            self.stats.discard,
            length,
            self._zero_or_discard,
            offset,
            length,
            None,
            WriteFlags.NONE,
        )

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        unmap: bool = False,
        *,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make the range read as zeros; with ``unmap`` (may-unmap), the medium may give
        its space back, as a discard. With ``fua``, durable when this returns; with
        ``fast`` (NBD's fast zero), ENOTSUP at once, nothing changed, where the medium
        would have to write the zeros."""
        flags = (WriteFlags.FUA if fua else WriteFlags.NONE) | (
            WriteFlags.NO_FALLBACK if fast else WriteFlags.NONE
        )
        await self._requests.run(
            self.stats.zero, length, self._zero_or_discard, offset, length, unmap, flags
        )

    async def _zero_or_discard(
        self, offset: int, length: int, unmap: bool | None, flags: WriteFlags
    ) -> None:
        node = self._medium()
        self._check_write(node, offset, length)
        while True:
            try:
                if unmap is None:
                    await node.discard(offset, length)
                else:
                    await node.write_zeroes(offset, length, unmap, flags)
                break
            except BlockError as exc:
                if flags & WriteFlags.NO_FALLBACK and exc.errno == errno.ENOTSUP:
                    raise  # a refusal the caller asked for, not a failure of the medium
                if not await self._failed(node, "write", offset, exc):
                    return
        self.changed_ns = time.time_ns()

    async def block_status(self, offset: int, length: int) -> Extent:
        """What a prefix of the range holds (data, zeros; allocated in the top image or
        not), for sparse copies (SEEK_DATA/SEEK_HOLE) and servers that report allocation."""
        return await self._requests.run(None, 0, self._block_status, offset, length)

    async def _block_status(self, offset: int, length: int) -> Extent:
        node = self._medium()
        self._check_range(node, offset, length, write=False)
        return await node.block_status(offset, length)

    async def dirty_extent(self, bitmap: str, offset: int, length: int) -> tuple[int, bool]:
        """How many bytes from ``offset`` (at most ``length``) share the dirty state of
        ``offset`` in the medium's bitmap ``bitmap``, and that state (an NBD export's
        ``qemu:dirty-bitmap`` context)."""
        node = self._medium()
        self._check_range(node, offset, length, write=False)
        return find_below(node, bitmap)[1].extent(offset, length)

    def hold_bitmap(self, name: str) -> Callable[[], None]:
        """Mark the medium's bitmap ``name`` busy (an export serves it: it must not change
        under its clients); returns what releases it."""
        node, bitmap = find_below(self._medium(), name)
        check_usable(bitmap, node.name, node.read_only, changing=True)
        bitmap.busy = True

        def release() -> None:
            bitmap.busy = False

        return release

    def limits(self) -> Limits:
        """What a server should tell its clients about requests to this medium."""
        node = self._medium()
        return Limits(node.request_alignment, MAX_TRANSFER, node.discard_granularity)
