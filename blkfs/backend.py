"""The block backend API: everything a frontend may touch (QEMU's BlockBackend).

A :class:`BlockBackend` is a named, reference-counted root that stays put while media come
and go beneath it. Frontends (FUSE, ``.ctl``, the CLI) use only this module and
:mod:`blkfs.errors`; they never see a node. The backend checks every request once (medium
present, range, read-only state), counts it for drain and statistics, and hands it to the
root node.

Graph changes (insert, eject, change, delete) drain the backend first: new requests wait, the
ones in flight finish, the tree is replaced, then the waiting requests run against the new
medium. A change that fails leaves the old medium untouched.

A backend counts its references: its name (while it is not deleted) and every open user (a
frontend's open file). Users that write are counted apart: while one is open, ejecting,
changing to other media, rolling back or deleting is refused (EBUSY) unless forced, as QEMU
refuses to eject a locked tray, because a filesystem mounted on the disk would lose what it
has not written yet.

Every change of a backend (its medium, its size, its content in time, its name) asks
:meth:`BlockBackend.check_op` here, whoever sends it: the command layer, a frontend's
truncate, a job. A running job holds the backend still (QEMU's op blockers) until it ends.
Frontends keep no rules of their own.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from blkfs.block.dirty import check_usable, find_below
from blkfs.block.driver import Extent, Status
from blkfs.block.graph import Graph
from blkfs.block.node import RW, Child, Node
from blkfs.block.options import format_options, parse_bool, parse_options, parse_size
from blkfs.block.perm import ALL, FILTERED, WRITERS, Perm
from blkfs.block.policy import HostPolicy
from blkfs.block.request import Requests
from blkfs.error_policy import POLICIES, Action, Operation, Pause, Policy, action
from blkfs.errors import BlockError, LastingError, NotFound, OptionError
from blkfs.jobs.manager import JobManager

__all__ = [
    "BlockBackend",
    "BlockError",
    "BlockLayer",
    "Extent",
    "IoError",
    "Limits",
    "OptionError",
    "Status",
    "parse_bool",
    "parse_options",
    "parse_size",
]

log = logging.getLogger("blkfs.backend")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,127}$")
Listener = Callable[["BlockBackend", str], None]
"""Called with the backend and the event: 'medium', 'size' or 'delete'."""
Options = str | Mapping[str, Any]
Medium = str | Mapping[str, Any]
"""A validated medium: an option tree, or the name of an existing node."""
ON_CHANGE_CHOICES = ("follow", "error")


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


class BlockBackend:
    """A named root: the unit frontends open, read, write and change media on."""

    def __init__(
        self,
        layer: BlockLayer,
        name: str,
        read_only: bool = False,
        on_change: str = "follow",
        werror: Policy = "enospc",
        rerror: Policy = "report",
    ) -> None:
        self.layer = layer
        self.name = name
        self.on_change = on_change
        """What users that opened the backend before a media change see after it: the new
        medium ("follow", as a drive), or ESTALE until they open it again ("error")."""
        self.generation = 0
        """Counts media changes (insert, eject, change), so a user can tell which medium
        it opened."""
        self.refcnt = 1
        """References: the name while the backend is not deleted, and each open user."""
        self.named = True
        self.writers = 0
        """Open users that write (a loop device, a writable descriptor)."""
        self._requests = Requests()
        self.stats = self._requests.stats
        self._root: Child | None = None
        self._read_only = read_only
        self._graph_lock = trio.Lock()
        self._listeners: list[Listener] = []
        self._blockers: dict[object, tuple[str, str]] = {}
        """Who holds the backend still (a running job): why, and until when."""
        self.werror: Policy = werror
        self.rerror: Policy = rerror
        self._pause: Pause | None = None
        """Set while the error policy holds requests (see :mod:`blkfs.error_policy`)."""
        self.changed_ns = time.time_ns()
        """When the medium, its size or its contents last changed (for mtime)."""

    def __repr__(self) -> str:
        return f"<BlockBackend {self.name}>"

    # -- state -------------------------------------------------------------------------

    @property
    def has_medium(self) -> bool:
        return self._root is not None

    @property
    def read_only(self) -> bool:
        """True if writes are refused: the backend's switch, or a read-only medium."""
        return self._read_only or (self._root is not None and not self._root.can_write)

    def length(self) -> int:
        """The medium's size in bytes, 0 with no medium."""
        return self._root.node.size if self._root else 0

    @property
    def resizable(self) -> bool:
        return self._root is not None and Perm.RESIZE in self._root.perm

    @property
    def open_count(self) -> int:
        """Users that have the backend open (its name is not one)."""
        return self.refcnt - self.named

    def add_listener(self, listener: Listener) -> None:
        """Register a callback for medium, size and delete events (cache invalidation)."""
        self._listeners.append(listener)

    def stale(self, generation: int) -> bool:
        """Whether a user that opened the backend at ``generation`` must open it again."""
        return self.on_change == "error" and generation != self.generation

    def _media_changed(self) -> None:
        self.generation += 1
        self._notify("medium")

    def _notify(self, event: str) -> None:
        self.changed_ns = time.time_ns()
        for listener in list(self._listeners):
            listener(self, event)

    # -- who may change the backend (QEMU's op blockers) ------------------------------------

    def block(self, holder: object, reason: str, until: str) -> None:
        """Keep the backend's medium, size and content still for ``holder`` (a running job):
        every change but the holder's own is refused, saying ``reason`` and ``until`` when
        it may be tried again."""
        self._blockers[holder] = (reason, until)

    def unblock(self, holder: object) -> None:
        self._blockers.pop(holder, None)

    def check_op(
        self, what: str, *, by: object = None, writers: bool = False, force: bool = False
    ) -> None:
        """EBUSY unless ``what`` may change the backend now: no holder but ``by`` keeps it
        still, the error policy has not paused it and, for a change of what its users see
        (``writers``: eject, other media, rollback, delete), nobody has it open for writing.
        ``force`` passes writers and a pause (whose held requests then fail with EIO); a
        holder is never forced past: a job ends or is cancelled first."""
        for holder, (reason, until) in self._blockers.items():
            if holder is not by:
                raise BlockError(errno.EBUSY, f"{self.name}: {reason}; {what} {until}")
        if self._pause is not None and by is None and not (writers and force):
            raise BlockError(
                errno.EBUSY,
                f"{self.name}: {self._pause.describe()}; {what} "
                f"once resumed (make room, then 'cont {self.name}')"
                + (", or add force=on: the held requests then fail with EIO" if writers else ""),
            )
        if writers and not force:
            self._check_writers(what)
        if self._pause is not None and by is None:  # force=on: the held requests fail
            self._end_pause(abandon=True)

    def _check_writers(self, what: str) -> None:
        if self.writers:
            users = f"{self.writers} writer{'s' if self.writers > 1 else ''}"
            raise BlockError(
                errno.EBUSY,
                f"{self.name}: open for writing ({users}; a loop "
                "device does not show in lsof: losetup -j shows "
                f"it); refusing to {what}: a filesystem on it would "
                "lose what it has not written yet. Unmount and "
                "close it first, or add force=on",
            )

    # -- references ----------------------------------------------------------------------

    def ref(self, writer: bool = False) -> None:
        """A new user; a ``writer`` keeps the medium from being ejected or changed."""
        self.refcnt += 1
        self.writers += writer

    async def unref(self, writer: bool = False) -> None:
        """Drop a reference; the last one drains, flushes and closes the medium."""
        self.refcnt -= 1
        self.writers -= writer
        if self.refcnt == 0:
            self.layer._forget(self)
            async with self._graph_lock, self._requests.tracker.drained():
                root, self._root = self._root, None
                if root is not None:
                    try:
                        await root.node.flush()
                    finally:
                        await self._release(root)
            log.info("%s: closed", self.name)

    # -- I/O -----------------------------------------------------------------------------

    def root_node(self) -> Node:
        """The medium's root node: for block jobs and snapshots (the core), never a
        frontend, which knows no nodes."""
        return self._medium()

    async def rewind(self, call: Callable[[], Awaitable[None]], force: bool = False) -> None:
        """Run ``call``, which changes what the medium holds beneath its users (a rollback),
        with the backend drained and its graph still; refused under writers unless
        ``force``."""
        async with self._graph_lock:
            self.check_op("roll it back", writers=True, force=force)
            async with self._requests.tracker.drained():
                self._medium()
                await call()
        self._notify("medium")

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
        buffer needs no clearing); the whole range must lie within the medium."""
        await self._requests.run(self.stats.read, buf.nbytes, self._readinto, offset, buf)

    async def _readinto(self, offset: int, buf: memoryview) -> None:
        node = self._medium()
        self._check_range(node, offset, buf.nbytes, write=False)
        while True:
            try:
                await node.readinto(offset, buf)
                return
            except BlockError as exc:
                if not await self._failed(node, "read", offset, exc):
                    return

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None:
        """Write all of ``data`` at ``offset``; past the end is ENOSPC, as on a disk. With
        ``fua`` (NBD's force unit access), the write is durable when this returns."""
        await self._requests.run(self.stats.write, len(data), self._write, offset, data, fua)

    async def _write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        node = self._medium()
        self._check_write(node, offset, len(data))
        while True:
            try:
                await node.write(offset, data)
                break
            except BlockError as exc:
                if not await self._failed(node, "write", offset, exc):
                    return
        self.changed_ns = time.time_ns()
        if fua:
            await self._flush()

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
            self.stats.discard, length, self._zero_or_discard, offset, length, None
        )

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make the range read as zeros; with ``unmap`` (may-unmap), the medium may give
        its space back, as a discard."""
        await self._requests.run(
            self.stats.zero, length, self._zero_or_discard, offset, length, unmap
        )

    async def _zero_or_discard(self, offset: int, length: int, unmap: bool | None) -> None:
        node = self._medium()
        self._check_write(node, offset, length)
        while True:
            try:
                if unmap is None:
                    await node.discard(offset, length)
                else:
                    await node.write_zeroes(offset, length, unmap)
                break
            except BlockError as exc:
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

    async def truncate(self, length: int, shrink: bool = False) -> None:
        """Resize the medium if its tree can; the size listeners hear of it. A disk shrinks
        only when asked to with ``shrink``, as ``qemu-img resize --shrink``: a truncate to a
        smaller size is what ``dd`` without ``conv=notrunc`` does to its output, and it
        would throw away the end of the disk."""
        async with self._graph_lock:
            self.check_op("resize it")  # before the drain, which a paused request would hold
            async with self._requests.tracker.drained():
                await self._truncate(length, shrink)
        log.info("%s: resized to %d bytes", self.name, length)
        self._notify("size")

    async def _truncate(self, length: int, shrink: bool) -> None:
        node = self._medium()
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.name}: read-only medium")
        if length < node.size and not shrink:
            raise BlockError(
                errno.EPERM,
                f"{self.name}: refusing to shrink the disk from "
                f"{node.size} to {length} bytes; write in place "
                "(dd conv=notrunc) or shrink explicitly with "
                f"'{self.name} {length} shrink=on' > .ctl/resize",
            )
        await node.truncate(length)

    async def refresh_size(self) -> None:
        """Take the size the medium has now (an image resized on the host), as
        ``losetup -c`` does."""
        async with self._graph_lock:
            self.check_op("resize it")
            old = self.length()
            async with self._requests.tracker.drained():
                await self.layer.graph.refresh_sizes(self._medium())
        if self.length() != old:
            log.info("%s: size is now %d bytes", self.name, self.length())
            self._notify("size")

    async def allocated_bytes(self) -> int | None:
        """Host bytes the medium's image takes, if its tree knows."""
        if self._root is None:
            return 0
        return await self._root.node.driver.allocated_bytes()

    # -- media ---------------------------------------------------------------------------

    async def insert(self, options: Options) -> None:
        """Insert a medium into an empty backend."""
        tree = self.layer.parse(options)
        async with self._graph_lock:
            self.check_op("insert a medium")
            if self._root is not None:
                raise BlockError(
                    errno.EBUSY,
                    f"{self.name}: already has a medium (use change to replace it, or eject first)",
                )
            async with self._requests.tracker.drained():
                self._root = await self._open_medium(tree)
        log.info("%s: inserted %s", self.name, _spelled(tree))
        self._media_changed()

    async def eject(self, force: bool = False) -> None:
        """Remove the medium: drain, flush, close; the backend stays, with size 0. Refused
        while a user writes, and if the flush fails (the medium stays and serves), unless
        ``force``."""
        async with self._graph_lock:
            if self._root is None:
                raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium to eject")
            self.check_op("eject it", writers=True, force=force)
            async with self._requests.tracker.drained():
                await self._flush_outgoing(force)
                root, self._root = self._root, None
                await self._release(root)
        log.info("%s: ejected%s", self.name, " (forced)" if force else "")
        self._media_changed()

    async def change(
        self,
        options: Options,
        force: bool = False,
        *,
        same_data: bool = False,
        before_swap: Callable[[], Awaitable[None]] | None = None,
        by: object = None,
    ) -> None:
        """Replace the medium atomically; on an empty backend this is insert.

        The outgoing tree is drained and flushed before anything opens the new one, which
        may take over the outgoing tree's nodes (a filter put in front of the same image, an
        overlay on top of it) instead of opening their images again. While a user writes,
        only such a change is allowed unless ``force``: one whose new tree keeps the old
        medium's image (see :func:`_same_medium`). If building the new tree fails,
        the old medium stays as it was.

        A block job's switch passes ``same_data`` (the new medium holds the same data: not a
        media change, whoever writes), ``by`` (itself: the one holder the change may pass)
        and may run ``before_swap`` while the backend is drained (a mirror's last copy).
        """
        tree = self.layer.parse(options)
        async with self._graph_lock:
            self.check_op("change its medium", by=by)
            async with self._requests.tracker.drained():
                await self._change(tree, force, same_data, before_swap)
        log.info("%s: changed medium to %s", self.name, _spelled(tree))
        if same_data:
            self._notify("medium")
        else:
            self._media_changed()

    async def _change(
        self,
        tree: Medium,
        force: bool,
        same_data: bool,
        before_swap: Callable[[], Awaitable[None]] | None,
    ) -> None:
        old = self._root
        if before_swap is not None:
            await before_swap()
        if old is None:
            self._root = await self._open_medium(tree)
        else:
            await self._flush_outgoing(force)
            kept = self.layer.graph.subtree(old.node)
            self._root = await self._replace(old, tree, force or same_data)
            await self._release(old)
            await self._settle(kept)

    async def _settle(self, nodes: list[Node]) -> None:
        """Nodes the new medium took over from the old one and nobody writes any more (the
        old top under a new overlay) become read-only, as QEMU's blockdev-snapshot leaves
        them, so that their images are locked for reading only."""
        for node in nodes:
            if node.refcnt and not node.read_only and not node.perm & WRITERS:
                try:
                    await self.layer.graph.reopen(node.name, {"read-only": True})
                except BlockError as exc:
                    log.warning("%s: node %s stays writable: %s", self.name, node.name, exc.message)

    async def _replace(self, old: Child, tree: Medium, force: bool) -> Child:
        """The new root edge for ``tree``, checked as the final graph will be; on failure the
        old tree holds its permissions (and image locks) again."""
        graph = self.layer.graph
        shadowed: dict[str, Node] = {}
        try:
            with graph.departing(old, shadowed):
                graph.refresh_perms([old.node])  # give up what only the old tree needed
                new = await self._open_medium(tree)
            try:
                if not force and not _same_medium(old.node, new.node):
                    self._check_writers("change to other media")
                with graph.departing(old, shadowed):
                    graph.refresh_perms([new.node, old.node])
            except BaseException:
                await self._release(new)
                raise
        except BaseException:
            graph.unshadow(shadowed)
            try:
                graph.refresh_perms([old.node])
            except BlockError as exc:
                log.error(
                    "%s: the medium could not take its image locks back: %s", self.name, exc.message
                )
            raise
        return new

    async def _flush_outgoing(self, force: bool, going: str = "replacing the medium") -> None:
        """Flush the medium before it goes; a failure stops the command unless ``force``
        (whatever the error policy: a command fails, it does not wait for ``cont``)."""
        if self._root is None:
            raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium")
        try:
            await self._root.node.flush()
        except BlockError as exc:
            if not force:
                raise
            log.warning("%s: flush failed, %s anyway (force=on): %s", self.name, going, exc.message)

    def _root_perm(self, node: Node) -> Perm:
        return Perm.CONSISTENT_READ if self._read_only or node.read_only else RW

    @staticmethod
    def _root_shared(perm: Perm) -> Perm:
        """A writable backend is a disk with one writer, as a VM's disk is in QEMU (no
        share-rw): nobody else may write its image. A read-only one shares everything, so
        a CD can be read by many. (qemu-storage-daemon's FUSE export shares write too.)"""
        return ALL & ~Perm.WRITE if Perm.WRITE in perm else ALL

    async def _open_medium(self, tree: Medium) -> Child:
        graph = self.layer.graph
        node = await graph.open_node(tree, read_only=self._read_only)
        perm = self._root_perm(node)
        edge = node.attach(
            None, f"backend '{self.name}'", "root", FILTERED, perm, self._root_shared(perm)
        )
        try:
            graph.refresh_perms([node])
        except BaseException:
            await self._release(edge)
            raise
        return edge

    async def _release(self, edge: Child) -> None:
        edge.node.detach(edge)
        await self.layer.graph.unref(edge.node)

    # -- status --------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Everything status files show of this backend, as plain data."""
        return {
            "name": self.name,
            "deleted": not self.named,
            "medium": self.has_medium,
            "read-only": self.read_only,
            "size": self.length(),
            "allocated": await self.allocated_bytes(),
            "open": self.open_count,
            "writers": self.writers,
            "generation": self.generation,
            "on-change": self.on_change,
            "werror": self.werror,
            "rerror": self.rerror,
            "io-status": self._pause.io_status if self._pause else "ok",
            "paused": self._pause.as_dict() if self._pause else None,
            "stats": self.stats.as_dict(),
            "tree": _describe(self._root.node) if self._root else None,
        }


def _spelled(medium: Medium) -> str:
    return f"node {medium}" if isinstance(medium, str) else format_options(medium)


def _same_medium(old: Node, new: Node) -> bool:
    """Whether the new tree keeps serving the old one's medium: the image under the old
    filters lies in the new tree (a filter put in, taken out or replaced; an overlay put
    on top). A move down the old tree (to a backing file, which would drop the overlay's
    writes, or to an image's file node, which would hand its metadata to the guest) is not."""
    return _in_tree(_under_filters(old), new)


def _under_filters(node: Node) -> Node:
    while node.driver.is_filter:
        node = node.driver.filtered.node
    return node


def _in_tree(node: Node, root: Node) -> bool:
    return node is root or any(_in_tree(node, edge.node) for edge in root.children.values())


def _describe(node: Node) -> dict[str, Any]:
    """A node and its subtree as plain data (status, status.json)."""
    return {
        "node-name": node.name,
        "driver": node.driver.name,
        "read-only": node.read_only,
        "size": node.size,
        "options": node.given_options(),
        "info": node.driver.info(),
        "stats": node.stats.as_dict(),
        "dirty-bitmaps": node.bitmaps.info(),
        "in-flight": node.in_flight,
        "oldest-ms": node.oldest_host_call_ms(),
        "children": {role: _describe(edge.node) for role, edge in node.children.items()},
    }


class BlockLayer:
    """The registry of backends of one blkfs instance, over one graph of nodes."""

    def __init__(
        self, image_dirs: list[str] | None = None, nbd_servers: list[str] | None = None
    ) -> None:
        self.graph = Graph(policy=HostPolicy(image_dirs, nbd_servers or ()))
        self.jobs = JobManager(self)
        self._backends: dict[str, BlockBackend] = {}
        self._deleted: set[BlockBackend] = set()
        """Deleted backends that users still hold open."""
        self._added: dict[str, Node] = {}
        """Nodes added on their own (QMP's blockdev-add), each holding one reference, so
        that backends and exports can be made on them by name (``node=NAME``)."""
        self.io_error_listeners: list[IoErrorListener] = []
        """Told of every request a backend's medium fails (see :class:`IoError`)."""

    @property
    def image_dirs(self) -> tuple[str, ...] | None:
        return self.graph.policy.image_dirs

    def parse(self, options: Options) -> Medium:
        """Parse (if text) and validate options for a medium; OptionError if they are bad.
        ``node=NAME`` alone names an existing node as the whole medium (as QMP's
        blockdev-insert-medium takes a node name): the name is returned."""
        tree = parse_options(options) if isinstance(options, str) else dict(options)
        medium: Medium = tree
        if "node" in tree:
            if len(tree) > 1 or not isinstance(tree["node"], str):
                raise OptionError(
                    "node=NAME names an existing node as the whole medium and "
                    "takes no other options"
                )
            medium = tree["node"]
        self.graph.validate(medium)
        return medium

    def __iter__(self) -> Iterator[BlockBackend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def __contains__(self, name: str) -> bool:
        return name in self._backends

    def find(self, name: str) -> BlockBackend:
        backend = self._backends.get(name)
        if backend is None:
            raise NotFound("backend", name, f"no backend named '{name}'")
        return backend

    async def create(
        self,
        name: str,
        options: Options | None = None,
        *,
        read_only: bool = False,
        on_change: str = "follow",
        werror: Policy = "enospc",
        rerror: Policy = "report",
    ) -> BlockBackend:
        """A new backend, with a medium from ``options`` or empty; nothing is left behind
        if the medium cannot be opened."""
        if not NAME_RE.match(name):
            raise BlockError(
                errno.EINVAL,
                f"invalid backend name '{name}': use letters, digits and _.+:- "
                "(not starting with . or -), at most 128 characters",
            )
        if name in self._backends:
            raise BlockError(errno.EEXIST, f"a backend named '{name}' already exists")
        if on_change not in ON_CHANGE_CHOICES:
            raise OptionError(
                f"on-change must be {' or '.join(ON_CHANGE_CHOICES)} (got {on_change!r})"
            )
        for key, policy in (("werror", werror), ("rerror", rerror)):
            if policy not in POLICIES:
                raise OptionError(f"{key} must be {', '.join(POLICIES)} (got {policy!r})")
        backend = BlockBackend(self, name, read_only, on_change, werror, rerror)
        self._backends[name] = backend  # reserve the name while the medium opens
        try:
            if options is not None:
                await backend.insert(options)
        except BaseException:
            del self._backends[name]
            raise
        log.info("%s: created", name)
        return backend

    async def delete(self, name: str, force: bool = False) -> None:
        """Remove the name; the backend lives on while references remain. Refused while a
        user writes (a mounted filesystem would lose its disk's name, and with it every
        snapshot, rollback and job) unless ``force``. When the name is the last reference,
        the medium is flushed first, so a flush that fails (a full host disk) fails the
        delete and changes nothing, unless ``force``."""
        backend = self.find(name)
        backend.check_op("delete it", writers=True, force=force)
        if backend.refcnt == 1 and backend.has_medium:
            await backend._requests.run(
                backend.stats.flush, 0, backend._flush_outgoing, force, "deleting it"
            )
            if self._backends.get(name) is not backend:  # deleted meanwhile
                raise BlockError(errno.ENOENT, f"no backend named '{name}'")
            backend.check_op("delete it", writers=True, force=force)  # a job came meanwhile
        try:
            await self._drop(backend)
        except BlockError as exc:  # the closing flush: the name is gone either way
            if not force:
                raise
            log.warning("%s: closed without a successful flush: %s", name, exc.message)

    async def _drop(self, backend: BlockBackend) -> None:
        name = backend.name
        del self._backends[name]
        backend.named = False
        self._deleted.add(backend)
        log.info("%s: deleted", name)
        try:
            await backend.unref()
        finally:
            backend._notify("delete")

    def _forget(self, backend: BlockBackend) -> None:
        """The last reference of a deleted backend went: it is closed."""
        self._deleted.discard(backend)

    async def reopen(self, node_name: str, options: Options) -> None:
        """Change the options of a live node atomically (QEMU's blockdev-reopen). A backend
        follows its root node's read-only flag, its switch included: it stops writing
        before the node turns read-only, and writes again once the node is writable."""
        tree = parse_options(options) if isinstance(options, str) else dict(options)
        node = self.graph.find(node_name)
        roots = [b for b in self if b._root is not None and b._root.node is node]
        try:
            to_read_only = parse_bool(tree.get("read-only", node.read_only))
        except ValueError:
            to_read_only = node.read_only  # the reopen itself reports the bad value
        for backend in roots:
            if to_read_only:
                assert backend._root is not None
                backend._root.perm, backend._root.shared = Perm.CONSISTENT_READ, ALL
        try:
            await self.graph.reopen(node_name, tree)
        finally:
            for backend in roots:
                assert backend._root is not None
                backend._read_only = node.read_only
                backend._root.perm = backend._root_perm(node)
                backend._root.shared = backend._root_shared(backend._root.perm)
            self.graph.refresh_perms([node])
        log.info("node %s: reopened with %s", node_name, format_options(tree))
        for backend in self:
            if backend._root is not None:
                backend._notify("medium")

    def watch_io_errors(self, listener: IoErrorListener) -> Callable[[], None]:
        """Have ``listener`` hear of every failed request of every backend; returns what
        stops it. It is called in the request's task and must not block."""
        self.io_error_listeners.append(listener)
        return lambda: self.io_error_listeners.remove(listener)

    async def add_node(self, name: str, options: Mapping[str, Any]) -> None:
        """Open a tree whose root is named ``name`` and hold it, with no backend (QEMU's
        blockdev-add); nothing is left open if it fails."""
        if not NAME_RE.match(name):
            raise BlockError(
                errno.EINVAL,
                f"invalid node name '{name}': use letters, digits "
                "and _.+:- (not starting with . or -)",
            )
        if name in self.graph.nodes:
            raise BlockError(errno.EEXIST, f"a node named '{name}' already exists")
        tree = {**options, "node-name": name}
        self.graph.validate(tree)
        self._added[name] = await self.graph.open_node(tree)
        log.info("node %s: added", name)

    async def delete_node(self, name: str) -> None:
        """Let go of a node :meth:`add_node` opened (QEMU's blockdev-del); EBUSY while a
        backend or another node uses it."""
        node = self._added.get(name)
        if node is None:
            raise BlockError(
                errno.ENOENT,
                f"no node named '{name}' was added on its own"
                if name in self.graph.nodes
                else f"no node named '{name}'",
            )
        if node.refcnt > 1:
            raise BlockError(errno.EBUSY, f"node '{name}' is in use")
        del self._added[name]
        await self.graph.unref(node)
        log.info("node %s: deleted", name)

    def added_nodes(self) -> list[dict[str, Any]]:
        """The nodes added on their own, as status shows trees."""
        return [_describe(node) for node in self._added.values()]

    async def close(self) -> list[str]:
        """Shut down: drop every backend (each drains, flushes and closes when free). One
        that fails to flush is closed anyway, and named in the list returned (and the log);
        the others still close cleanly."""
        failures = []
        for backend in [*self._backends.values(), *self._deleted]:
            if backend.paused:  # nobody will make room now: the held requests fail
                backend._end_pause(abandon=True)
        for backend in list(self._backends.values()):
            try:
                await self._drop(backend)
            except BlockError as exc:
                log.error("%s: closed, but the final flush failed: %s", backend.name, exc.message)
                failures.append(f"{backend.name}: {exc.message}")
            except Exception:  # a bug: say so, and still close the others
                log.exception("%s: closing failed", backend.name)
                failures.append(f"{backend.name}: closing failed (a bug; see the log)")
        for name, node in list(self._added.items()):
            del self._added[name]
            try:
                await self.graph.unref(node)
            except BlockError as exc:
                log.error("node %s: closing failed: %s", name, exc.message)
                failures.append(f"node {name}: {exc.message}")
        return failures

    async def status(self) -> list[dict[str, Any]]:
        """Every backend, and those deleted that users still hold open."""
        return [await b.status() for b in [*self._backends.values(), *self._deleted]]
