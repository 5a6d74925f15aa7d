"""The BlockDriver base class: what a driver implements, and the fallbacks it inherits.

A driver is a small class: a name, flags, declared options and children, and a few async
methods. The layer (:mod:`blkfs.block.node`) has already checked bounds, read-only state and
alignment before any method here runs, so drivers may assume a request is in range.

A filter (``is_filter``) that leaves a data method out passes it to its filtered child, as
QEMU's filters and nbdkit's ``next`` do. A format or protocol driver that leaves an optional
method out gets the generic behaviour named in its docstring.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Flag
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, NamedTuple

from blkfs.block.options import COMMON_OPTIONS, ChildSpec, Option
from blkfs.block.perm import Perm, child_perm
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.block.context import NodeContext
    from blkfs.block.node import Child, Node

ZERO_CHUNK = 1 << 20


class WriteFlags(Flag):
    """How a write or a zero write must be done (QEMU's BdrvRequestFlags, the two that NBD
    carries)."""

    NONE = 0
    FUA = 1
    """Durable when the request returns (NBD_CMD_FLAG_FUA; O_DSYNC for this write only)."""
    NO_FALLBACK = 2
    """Zero writes only: ENOTSUP at once, nothing changed, where zeroing would be no faster
    than writing zeros (NBD_CMD_FLAG_FAST_ZERO; QEMU's BDRV_REQ_NO_FALLBACK)."""


class Status(Flag):
    """What block_status knows of a range (QEMU's BDRV_BLOCK_* bits, simplified)."""

    DATA = 1  # reads return stored data
    ZERO = 2  # reads return zeros
    ALLOCATED = 4  # this node (not a backing file) decides the contents


@dataclass(frozen=True)
class Extent:
    """``length`` bytes from the queried offset share one status."""

    length: int
    status: Status


class Located(NamedTuple):
    """Where a range's bytes lie, as :meth:`BlockDriver.locate` tells."""

    child: Child | None
    """Read them from this child (None: they read as zeros)."""
    offset: int
    """At this offset of ``child``."""
    passed: tuple[Node, ...] = ()
    """The nodes between the asking driver and ``child``, whose request paths a direct
    read skips: it must be admitted by their trackers instead (so a drain waits for it)."""


class BlockDriver:
    """Base of every driver. Subclasses set ``name`` and override what they implement."""

    name: ClassVar[str]
    options: ClassVar[Mapping[str, Option]] = {}
    children: ClassVar[Mapping[str, ChildSpec]] = {}
    is_filter: ClassVar[bool] = False
    """A filter passes whatever it does not override to ``filtered_role``."""
    filtered_role: ClassVar[str] = "file"
    is_format: ClassVar[bool] = False
    """A format may be chosen by probing (see :meth:`probe`)."""

    growable: ClassVar[bool] = False
    """Writes past the end extend the node (a protocol over a host file), as a format driver
    needs when it appends clusters. A filter is as growable as the node below it."""

    reopen_drains: ClassVar[bool] = True
    """Reopen drains the node first. A filter whose requests may wait long (throttle, delay)
    applies new options between requests instead, so that retuning it takes effect at once."""

    request_alignment: int = 1
    """Smallest unit the driver can address; the layer read-modify-writes around it."""

    discard_granularity: int = 1
    """Smallest unit a discard frees (a qcow2 cluster): what users of the medium are told."""

    supported_write_flags: WriteFlags = WriteFlags.NONE
    """The :class:`WriteFlags` the driver honours itself; the layer passes only those on and
    does the rest: FUA as the request then a flush of the node, NO_FALLBACK as ENOTSUP at
    once unless the range reads as zeros already. A filter gets every flag, and passes it
    on with the request."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node
        """This driver's node, as far as a driver may see it."""

    # -- helpers for subclasses ----------------------------------------------------------

    def child(self, role: str) -> Child:
        """The child edge in ``role``; a KeyError means the driver forgot to declare it."""
        return self.node.children[role]

    @property
    def filtered(self) -> Child:
        return self.node.children[self.filtered_role]

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """How sure this format is that ``header`` (the first bytes of a file) is its own;
        0 for no. Only format drivers are asked."""
        return 0

    @classmethod
    def create(
        cls,
        file: BinaryIO,
        size: int,
        options: Mapping[str, str],
        backing: str | None,
        backing_format: str | None,
    ) -> None:
        """Lay out a new empty image of ``size`` bytes in the (new, empty) ``file``, with
        ``qemu-img create -o`` style ``options``; raise EINVAL for options it cannot honour.
        Only format drivers create images; the layer creates, syncs and cleans up the file."""
        raise BlockError(errno.ENOTSUP, f"{cls.name} cannot create images")

    @classmethod
    async def create_volume(cls, values: Mapping[str, Any], size: int) -> None:
        """Make the new, empty volume of ``size`` bytes that a node with the option
        ``values`` would open (``qemu-img create rbd:POOL/IMAGE``); EEXIST if it exists. Only
        protocols whose volumes live in a service rather than in a host file make them."""
        raise BlockError(errno.ENOTSUP, f"{cls.name} cannot create volumes")

    @classmethod
    async def check(cls, file: Child, repair: bool) -> dict[str, Any]:
        """Check the metadata of the image in ``file`` as ``qemu-img check`` does, and with
        ``repair`` lower leaked refcounts; returns qemu-img's JSON fields (``corruptions``,
        ``leaks``, ``leaks-fixed``, ``check-errors``, ``messages``, ...). Only formats with
        metadata check anything."""
        raise BlockError(errno.ENOTSUP, f"{cls.name} images have no metadata to check")

    @classmethod
    def same_node(cls, values: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
        """Whether a node opened with ``values`` is what ``wanted`` asks for (the same image,
        the same options), so that a new medium may take it over; node name and read-only
        state are compared by the layer."""
        ignored = ("node-name", "read-only")
        return {k: v for k, v in values.items() if k not in ignored} == {
            k: v for k, v in wanted.items() if k not in ignored
        }

    def reusable(self) -> bool:
        """Whether a new medium may take this node over (see :meth:`same_node`); one whose
        host file failed a flush must be opened afresh."""
        return True

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        """Set the driver up from validated option values. Auto children are already attached;
        ``children`` holds the raw options of the others (missing, None, dict or node name)."""

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """Apply new option values (all of them, changed or not) atomically; the node is
        drained. The default accepts changes to the common options only: a driver with
        live-tunable options overrides this, and raises without changing anything if it
        cannot apply them."""
        for name, value in values.items():
            if name not in COMMON_OPTIONS and self.node.values.get(name) != value:
                raise BlockError(
                    errno.EINVAL, f"{self.name}: option '{name}' cannot be changed on a live node"
                )

    async def close(self) -> None:
        """Release host resources. Children are closed by the layer afterwards."""

    # -- permissions ---------------------------------------------------------------------

    def child_perm(
        self, child: Child, writable: bool, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm]:
        """What this node, holding ``perm`` and sharing ``shared`` (and open for writing if
        ``writable``), needs of ``child`` and lets others do to it; generic: QEMU's rules for
        the child's role."""
        return child_perm(child.role, writable, perm, shared)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """Prepare to hold ``perm`` and refuse what is not in ``shared`` on whatever the
        driver holds outside the graph (a protocol driver's host file); raise BlockError if
        another user refuses. Either :meth:`set_perm` or :meth:`abort_perm` follows."""

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        """Hold exactly what the last :meth:`check_perm` prepared."""

    def abort_perm(self) -> None:
        """Go back to what was held before the last :meth:`check_perm`."""

    # -- data path -----------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        if not self.is_filter:
            raise NotImplementedError(f"{self.name} cannot read")
        await self.filtered.readinto(offset, buf)

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """Fill ``buf`` with the bytes at ``offset`` without awaiting, if that cannot block
        (a host file whose page cache holds them, with no host call on the range in
        flight); False, ``buf`` in any state, if not. The request path's short path
        (:meth:`Node.read_now`) ends here, at the driver where :meth:`locate` stops.
        Generic: False."""
        return False

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Store ``data`` at ``offset``; ``flags`` holds only :attr:`supported_write_flags`."""
        if not self.is_filter:
            raise BlockError(errno.EROFS, f"{self.name} does not support writing")
        await self.filtered.write(offset, data, flags)

    async def flush(self) -> None:
        """Make acknowledged writes durable; generic: flush every child."""
        for child in list(self.node.children.values()):
            if child.can_write:
                await child.flush()

    async def discard(self, offset: int, length: int) -> None:
        """Tell the node the range is unused; generic: filters pass it on, others ignore it
        (discard is advisory: afterwards the range reads as data or zeros)."""
        if self.is_filter:
            await self.filtered.discard(offset, length)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Make the range read as zeros; generic: write zeros (unmap is a hint). A driver
        that supports NO_FALLBACK never gets here with it."""
        if self.is_filter:
            await self.filtered.write_zeroes(offset, length, unmap, flags)
            return
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            chunk = min(end - offset, len(zeros))
            await self.write(offset, zeros[:chunk], flags)
            offset += chunk

    async def length(self) -> int:
        """The node's size in bytes (asked once after open and after each truncate)."""
        if not self.is_filter:
            raise NotImplementedError(f"{self.name} has no length")
        return self.filtered.node.size

    async def truncate(self, length: int) -> None:
        """Resize the node; generic: not supported."""
        if self.is_filter:
            await self.filtered.truncate(length)
            return
        raise BlockError(errno.ENOTSUP, f"{self.name} images cannot be resized")

    async def block_status(self, offset: int, length: int) -> Extent:
        """The status of a prefix of the range; generic: allocated data."""
        if self.is_filter:
            return await self.filtered.block_status(offset, length)
        return Extent(length, Status.DATA | Status.ALLOCATED)

    async def allocated_bytes(self) -> int | None:
        """Host bytes this node's image takes, or None if unknown; generic: those of the
        ``file`` (or filtered) child, never of a backing file."""
        role = self.filtered_role if self.is_filter else "file"
        child = self.node.children.get(role)
        return await child.node.driver.allocated_bytes() if child else None

    async def make_empty(self) -> None:
        """Drop everything this image holds, so it shows its backing file again (QEMU's
        bdrv_make_empty); the node is drained. Generic: not supported."""
        raise BlockError(errno.ENOTSUP, f"{self.name} images cannot be emptied")

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Record another backing file (or none) in the image header (QEMU's
        bdrv_change_backing_file); the layer has switched the backing child already.
        Generic: not supported."""
        raise BlockError(errno.ENOTSUP, f"{self.name} images name no backing file")

    def check_new_bitmap(self, name: str, granularity: int) -> None:
        """Raise unless the image can store a new persistent dirty bitmap (QEMU's
        bdrv_can_store_new_dirty_bitmap); it is stored at close, with the others."""
        raise BlockError(errno.ENOTSUP, f"{self.name} images cannot store dirty bitmaps")

    async def remove_stored_bitmap(self, name: str) -> None:
        """Drop a persistent bitmap from the image now (a stored one is gone at once, as
        QEMU's block-dirty-bitmap-remove)."""

    def children_changed(self) -> None:
        """A child was replaced (a job's switch): forget what was learnt from the old one."""

    def locate(self, offset: int, length: int, *, write: bool = False) -> Located | None:
        """Where the ``length`` bytes at ``offset`` lie, if the driver knows at once (no I/O,
        no await): a format over a backing chain reads them there instead of through each
        layer (QEMU's block status with its ``map`` and ``file``), and a copy between host
        files (:mod:`blkfs.block.host_copy`) finds both ends with it. None when it cannot say
        (metadata not in memory, compressed data, more than one run). With ``write``: where
        a write of the range may go instead, as it is, with nothing else for this driver to
        do (no allocation, no metadata, no check of the data). A driver whose answers can
        change tells those who watch them (:meth:`watch_locations`). Generic: None."""
        return None

    async def copy_from(self, offset: int, source: Node, source_offset: int, length: int) -> bool:
        """Copy ``length`` bytes of the node ``source`` (at ``source_offset``) to ``offset`` without
        them passing through the process, if both drivers hold their data the same way (two
        host files: ``copy_file_range``; a format whose image file can, allocating as a
        write would); False if they cannot, having written nothing a write of the range
        would not have. Called by the layer for ranges :meth:`locate` mapped the source of,
        and the target of as far as it could. Generic: False."""
        return False

    def copies_from(self, source: Node) -> bool:
        """Whether :meth:`copy_from` may copy from ``source`` (known at once, no I/O; it may
        still find out it cannot). Generic: False."""
        return False

    def watch_locations(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` (once) when an answer :meth:`locate` gave may no longer hold.
        Generic: answers never change (a driver that gives them maps a fixed range)."""

    def unwatch_locations(self, changed: Callable[[], None]) -> None:
        """Forget ``changed``."""

    def info(self) -> dict[str, Any]:
        """Driver facts for status output (format details, counters)."""
        return {}

    def host_call_ns(self) -> int | None:
        """How long the oldest host call this driver has on a worker has run (ns), or None
        if none runs (status shows it; see :mod:`blkfs.block.workers`). Generic: None."""
        return None

    def let_go(self, error: BlockError) -> int:
        """Give up the host calls in flight: answer their requests with ``error`` now and
        every later request too; the calls keep their threads (and the host file stays open)
        until they return. For a node whose device does not answer, leaving the graph with
        force=on. Returns how many requests were answered. Generic: nothing to give up."""
        return 0
