"""Nodes (QEMU's BlockDriverState) and the Child edges between them.

A :class:`Node` owns one driver instance and is the request path in front of it: every request
to a node, whether from a backend or from a parent driver through a :class:`Child`, is checked
here once (range, read-only state, alignment) and tracked for drain. Drivers therefore never
re-check what a request looks like.

A node may have several parents (one base image shared by two overlays); at most one of them
may hold the WRITE permission, and none may if the node is read-only.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Protocol

from blkfs.block.dirty import DirtyBitmaps
from blkfs.block.driver import BlockDriver, Extent, Status, WriteFlags
from blkfs.block.options import COMMON_OPTIONS
from blkfs.block.perm import ALL, NO_PERM, Perm, Role, Use
from blkfs.block.request import RangeLocks, Requests, align_down, align_up, is_aligned, is_zero
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.block.graph_build import BuildingGraph

FAST_ZERO_EXTENTS = 16
"""Block status calls a fast zero the driver cannot do may take to find the range zeroed
already: more would not be fast."""
BOUNCE_KEPT = 2 << 20
"""The largest read-modify-write buffer kept for the next one (a 1 MiB write that the
kernel split at a user buffer's page offset, with its two blocks)."""
_spare_bounce: list[bytearray] = []
"""The buffer of the last read-modify-write of any node, for the next (:meth:`Node._bounce`):
one for the process, so that a thousand backends hold no more than one."""


class WriteCall(Protocol):
    """:meth:`Node.write`, as a child edge holds it."""

    async def __call__(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        flags: WriteFlags = WriteFlags.NONE,
    ) -> None: ...


class Child:
    """An edge from a parent (a node, or a backend) to a node: the child's name in the parent
    ("file", "backing", "root"), its :class:`Role`, and the permissions the parent holds on it
    and shares with others (set by :meth:`Graph.refresh_perms`).

    Drivers talk to their children only through this object, so every child request goes
    through the child node's request path.
    """

    __slots__ = ("label", "name", "node", "parent", "perm", "readinto", "role", "shared", "write")

    readinto: Callable[[int, memoryview], Awaitable[None]]
    """Fill the buffer with the child's bytes at the offset."""
    write: WriteCall
    """Write the data at the offset of the child."""

    def __init__(
        self,
        parent: Node | None,
        label: str,
        node: Node,
        name: str,
        role: Role,
        perm: Perm = NO_PERM,
        shared: Perm = ALL,
    ) -> None:
        self.parent = parent
        """The parent node; None for a backend's root edge, whose permissions are set by
        the backend."""
        self.label = label
        self.node = node
        self.readinto = node.readinto  # the hot two: the node's own, no call in between
        self.write = node.write
        self.name = name
        self.role = role
        self.perm = perm
        self.shared = shared

    def __repr__(self) -> str:
        return f"<Child {self.label} -> {self.node.name} as {self.name}>"

    @property
    def can_write(self) -> bool:
        return Perm.WRITE in self.perm

    def use(self, perm: Perm | None = None, shared: Perm | None = None) -> Use:
        """This edge's permissions (or the given ones) as :mod:`blkfs.block.perm` compares
        them."""
        who = (
            f"node '{self.label}' (as its '{self.name}')" if self.parent is not None else self.label
        )
        return Use(
            self.perm if perm is None else perm, self.shared if shared is None else shared, who
        )

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.node.readinto(offset, memoryview(buf))
        return buf

    async def flush(self) -> None:
        await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.node.discard(offset, length)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self.node.write_zeroes(offset, length, unmap, flags)

    async def truncate(self, length: int) -> None:
        await self.node.truncate(length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.node.block_status(offset, length)


class Node:
    """One driver instance in the graph, with its request path."""

    def __init__(
        self,
        graph: BuildingGraph,
        name: str,
        driver_cls: type[BlockDriver],
        values: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> None:
        self.graph = graph
        self.name = name
        self.values = dict(values)
        """Typed option values, by dotted name."""
        self.options = dict(options)
        """The options as given (children included), for status output."""
        self.driver = driver_cls(self)
        self.children: dict[str, Child] = {}
        self.parents: list[Child] = []
        self.probed = False
        """The format was chosen by probing the image's first bytes (see the raw driver)."""
        self.perm = NO_PERM
        self.shared = ALL
        """What the parents need together and let others do (applied by the graph)."""
        self.refcnt = 1
        self.size = 0
        self.request_alignment = 1
        self.growable = False
        self.discard_granularity = 1
        """Limits, asked of the driver once at open (see :meth:`learn_limits`)."""
        self._requests = Requests()
        self.stats = self._requests.stats
        self.tracker = self._requests.tracker
        """Requests in flight (for drain); a read that skips this node's request path
        (:meth:`BlockDriver.locate`) is admitted here instead."""
        self._write_ranges = RangeLocks()
        self.bitmaps = DirtyBitmaps(name)
        """Its dirty bitmaps: every write, write-zeroes and discard here marks them."""

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.driver.name}>"

    @property
    def read_only(self) -> bool:
        return bool(self.values["read-only"])

    def given_options(self) -> dict[str, Any]:
        """The option values that differ from their defaults: what status shows."""
        schema = {**COMMON_OPTIONS, **self.driver.options}
        return {
            key: value
            for key, value in self.values.items()
            if value is not None and (key not in schema or value != schema[key].default)
        }

    def filename(self) -> str | None:
        """The host file this node's data lives in, looking through filters and from a
        format node to its ``file`` child (QEMU's bs->filename): what a relative backing
        file name is relative to, what a header names as backing file."""
        node = self
        while "filename" not in node.values:
            if node.driver.is_filter:
                node = node.driver.filtered.node
            elif "file" in node.children:
                node = node.children["file"].node
            else:
                return None
        return str(node.values["filename"])

    @property
    def in_flight(self) -> int:
        return self._requests.tracker.in_flight

    def oldest_host_call_ms(self) -> int | None:
        """How long the driver's oldest host call in flight has run, or None if none runs
        (or the driver makes none): a device that stopped answering shows as a growing age
        on its protocol node, and as requests in flight on the nodes above."""
        age = self.driver.host_call_ns()
        return None if age is None else age // 1_000_000

    def learn_limits(self) -> None:
        """Ask the driver its limits once (after open and reopen), as nbdkit asks a plugin's
        capabilities once: a filter inherits growth, and the coarser alignment, from the node
        it filters, so no filter has to say so itself."""
        driver = self.driver
        self.request_alignment = driver.request_alignment
        self.growable = driver.growable
        self.discard_granularity = max(driver.discard_granularity, self.request_alignment)
        if driver.is_filter:
            below = driver.filtered.node
            self.request_alignment = max(self.request_alignment, below.request_alignment)
            self.growable = below.growable
            self.discard_granularity = max(self.discard_granularity, below.discard_granularity)

    # -- graph -------------------------------------------------------------------------

    def attach(
        self,
        parent: Node | None,
        label: str,
        name: str,
        role: Role,
        perm: Perm = NO_PERM,
        shared: Perm = ALL,
    ) -> Child:
        """Add a parent edge. Its permissions are checked and applied by
        :meth:`Graph.refresh_perms`, which the caller runs next."""
        edge = Child(parent, label, self, name, role, perm, shared)
        self.parents.append(edge)
        return edge

    def detach(self, edge: Child) -> None:
        self.parents.remove(edge)

    async def open_child(
        self, name: str, options: dict[str, Any] | str, role: Role, *, read_only: bool = False
    ) -> Child:
        """Open (or reference, for a node name) a child and attach it as ``name``; drivers
        call this for children they open themselves, such as a backing file named in an
        image header (opened read-only, and never one of this node's own images: a loop).
        The child's permissions follow from ``role`` and this node's."""
        if self.values["force-share"] and isinstance(options, dict):
            options = {**options, "force-share": True}  # the children share as it does
        if self.values["cache.no-flush"] and isinstance(options, dict):
            options = {"cache.no-flush": True, **options}  # unless they say otherwise
        if Role.COW in role:
            with self.graph.opening_backing_of(self):
                child = await self.graph.open_node(options, read_only=True)
        else:
            child = await self.graph.open_node(options, read_only=read_only or self.read_only)
        edge = child.attach(self, self.name, name, role)
        self.children[name] = edge
        try:
            self.graph.refresh_perms([self])
        except BaseException:
            del self.children[name]
            child.detach(edge)
            await self.graph.unref(child)
            raise
        return edge

    async def open_host_file(self, path: str, writable: bool) -> int:
        return await self.graph.open_host_file(self, path, writable)

    def hold_host_file(self, held_by: str) -> None:
        self.graph.hold_host_file(self, held_by)

    def reopen_host_file(self, path: str, writable: bool) -> int:
        return self.graph.policy.open(path, writable)

    def close_host_file(self, fd: int) -> None:
        self.graph.close_host_file(self, fd)

    def check_nbd_server(self, path: str | None, host: str | None, port: int) -> None:
        self.graph.policy.check_nbd_server(path, host, port)

    def check_rbd_image(self, image: str) -> None:
        self.graph.policy.check_rbd_image(image)

    def probe_format(self, header: bytes) -> str:
        return self.graph.probe_bytes(header)

    def registry(self, kind: str) -> dict[str, Any]:
        return self.graph.registry(kind)

    async def close_child(self, name: str) -> None:
        edge = self.children.pop(name)
        edge.node.detach(edge)
        await self.graph.unref(edge.node)

    async def refresh_size(self) -> None:
        self.size = await self.driver.length()
        self.bitmaps.resize(self.size)

    def drained(self) -> AbstractAsyncContextManager[None]:
        """Hold new requests to this node and wait for those in flight (for reopen)."""
        return self._requests.tracker.drained()

    # -- request path ------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(
                errno.EIO,
                f"node '{self.name}': request {offset}+{length} is outside its {self.size} bytes",
            )

    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"node '{self.name}' is read-only")
        if self.growable and offset >= 0 and length >= 0:
            return
        self._check(offset, length)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        length = buf.nbytes
        self._check(offset, length)
        align = self.request_alignment
        read = (
            self.driver.read
            if align == 1 or is_aligned(offset, length, align)
            else self._read_unaligned
        )
        await self._requests.run(self.stats.read, length, read, offset, buf)

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """The request path's short path: fill ``buf`` at once if the range maps, through
        this node and those below (:meth:`BlockDriver.locate`), to zeros or to a driver that
        reads it without blocking (:meth:`BlockDriver.read_now`: a host file's page cache);
        False, ``buf`` in any state, if not, or if a node on the way is drained (the read
        then takes the request path, and waits at that node's door). Nothing awaits in
        between, so no mapping changes and no drain begins under the read: the nodes it
        skips need not count it in flight, and a write in flight on the host range is
        seen by the host file's range locks."""
        node, length = self, buf.nbytes
        while not node.tracker.quiesced:
            located = node.driver.locate(offset, length)
            if located is None:
                return node.request_alignment == 1 and node.driver.read_now(offset, buf)
            child, offset, passed = located  # one unpacking costs less than three lookups
            for skipped in passed:
                if skipped.tracker.quiesced:
                    return False
            if child is None:
                buf[:] = bytes(length)
                return True
            node = child.node
        return False

    async def _read_unaligned(self, offset: int, buf: memoryview) -> None:
        """Read the ``request_alignment`` blocks around the range and copy out of them."""
        align = self.request_alignment
        length = buf.nbytes
        start = align_down(offset, align)
        bounce = bytearray(min(align_up(offset + length, align), self.size) - start)
        await self.driver.read(start, memoryview(bounce))
        buf[:] = bounce[offset - start : offset - start + length]

    async def write(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        flags: WriteFlags = WriteFlags.NONE,
    ) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        length = view.nbytes
        self._check_write(offset, length)
        detect = self.values["detect-zeroes"]
        if detect != "off" and length and is_zero(view):
            await self.write_zeroes(offset, length, unmap=detect == "unmap", flags=flags)
            return
        self.bitmaps.mark(offset, length)
        await self._requests.run(self.stats.write, length, self._write, offset, view, flags)

    def _own_flags(self, flags: WriteFlags) -> WriteFlags:
        """What of ``flags`` the driver does itself (the rest is the layer's to do)."""
        return flags if self.driver.is_filter else flags & self.driver.supported_write_flags

    async def _write(self, offset: int, view: memoryview, flags: WriteFlags) -> None:
        # most writes have no flags: no Flag arithmetic for them (each is a Python call)
        own = self._own_flags(flags) if flags else flags
        align = self.request_alignment
        if align == 1:
            await self.driver.write(offset, view, own)
        else:
            await self._write_aligned(offset, view, align, own)
        if offset + view.nbytes > self.size:  # a growable node grew
            self.size = offset + view.nbytes
        if flags and _layers_fua(flags, own):
            await self.driver.flush()

    async def _write_aligned(
        self, offset: int, view: memoryview, align: int, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Write whole ``align`` blocks, in one request as QEMU does (a log of writes shows
        the same): the blocks ``view`` covers only in part, one at either end at most, are
        read first (QEMU's head and tail padding), so a large write reads two blocks, not
        its whole range. Writes to overlapping blocks run one at a time, so a write landing
        between a read-modify-write's read and its write is not overwritten by the stale
        merge."""
        end = offset + view.nbytes
        start = align_down(offset, align)
        stop = min(align_up(end, align), max(self.size, end))
        async with self._write_ranges.hold(start, stop - start):
            if start == offset and stop == end:
                await self.driver.write(offset, view, flags)
                return
            bounce = self._bounce(stop - start)
            if stop - start <= 2 * align:  # a block or two: one read
                await self.driver.read(start, bounce)
            else:
                last = align_down(end, align)
                if start < offset:
                    await self.driver.read(start, bounce[:align])
                if end < stop:
                    await self.driver.read(last, bounce[last - start :])
            bounce[offset - start : end - start] = view
            await self.driver.write(start, bounce, flags)
            # kept only once the write is done (a cancelled one may still be reading it)
            spare = bounce.obj
            assert isinstance(spare, bytearray)
            if len(spare) <= BOUNCE_KEPT and not _spare_bounce:
                _spare_bounce.append(spare)

    @staticmethod
    def _bounce(length: int) -> memoryview:
        """A buffer for a read-modify-write: the spare one if it is large enough (a new
        1 MiB buffer costs as much again as the copy into it: each page is zeroed at its
        first touch), which is taken, so two writes never share it."""
        spare = _spare_bounce.pop() if _spare_bounce else bytearray()
        return memoryview(spare if len(spare) >= length else bytearray(length))[:length]

    async def copy_from(self, offset: int, source: Node, source_offset: int, length: int) -> bool:
        """Write here ``length`` bytes of ``source`` without them passing through the process,
        if the two drivers can (:meth:`BlockDriver.copy_from`): a write of this node and a
        read of ``source``, each tracked by its request path and counted once done; False
        if they cannot (or zeros would be detected here: a write sees them). A format copies
        through its image file's ``copy_from``: the read is tracked and counted there, where
        the bytes move (tracked twice, a drain of ``source`` between would wait for itself)."""
        self._check_write(offset, length)
        source._check(source_offset, length)
        if self.values["detect-zeroes"] != "off":
            return False
        self.bitmaps.mark(offset, length)
        start = perf_counter_ns()
        copy = functools.partial(self.driver.copy_from, offset, source, source_offset, length)
        if self.children:
            copied = await self._requests.run(None, 0, copy)
        else:
            copied = await self._requests.run(None, 0, source._requests.run, None, 0, copy)
        if copied:
            took = perf_counter_ns() - start
            self.stats.write.add(length, took)
            if not self.children:
                source.stats.read.add(length, took)
            if offset + length > self.size:  # a growable node grew
                self.size = offset + length
        return copied

    async def flush(self) -> None:
        if self.values["cache.no-flush"] and not self.children:
            return  # a leaf (host file, server) skips what makes data durable
        await self._requests.run(self.stats.flush, 0, self.driver.flush)

    async def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if self.values["discard"] == "ignore":
            return
        self.bitmaps.mark(offset, length)
        await self._requests.run(self.stats.discard, length, self.driver.discard, offset, length)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        self._check_write(offset, length)
        if flags and flags & WriteFlags.NO_FALLBACK and not self._zeroes_fast(offset, length):
            await self._requests.run(None, 0, self._zeroed_already, offset, length)
            return
        self.bitmaps.mark(offset, length)
        await self._requests.run(
            self.stats.zero,
            length,
            self._write_zeroes,
            offset,
            length,
            unmap and self.values["discard"] == "unmap",
            flags,
        )

    def _zeroes_fast(self, offset: int, length: int) -> bool:
        """Whether the driver may be asked to zero the range with NO_FALLBACK: it takes the
        flag, and the range has no part-block ends to read-modify-write."""
        align = self.request_alignment
        return bool(self._own_flags(WriteFlags.NO_FALLBACK)) and is_aligned(offset, length, align)

    async def _zeroed_already(self, offset: int, length: int) -> None:
        """A fast zero the driver cannot do succeeds, doing nothing, where the range reads
        as zeros already, and is ENOTSUP elsewhere (as QEMU's qcow2 does at part-cluster
        ends); a format's block status answers this from its metadata, in a few calls."""
        position, end = offset, offset + length
        for _ in range(FAST_ZERO_EXTENTS):
            if position >= end:
                return
            extent = await self.driver.block_status(position, end - position)
            if Status.ZERO not in extent.status:
                break
            position += extent.length
        if position < end:
            raise BlockError(
                errno.ENOTSUP,
                f"node '{self.name}': zeroing {offset}+{length} would be no faster "
                "than writing zeros",
            )

    async def _write_zeroes(self, offset: int, length: int, unmap: bool, flags: WriteFlags) -> None:
        """The driver zeroes whole ``request_alignment`` blocks; the blocks at either end
        that the range covers only in part are written as zeros, read-modify-written like
        any unaligned write (QEMU's bdrv_co_do_pwrite_zeroes)."""
        own = self._own_flags(flags) if flags else flags
        align = self.request_alignment
        end = offset + length
        head = min(end, align_up(offset, align))
        tail = max(head, align_down(end, align))
        if head == offset and tail == end:  # aligned (always, with an alignment of 1)
            await self.driver.write_zeroes(offset, length, unmap, own)
        elif head == tail:  # no whole block inside: one read-modify-write, as QEMU's
            await self._write_aligned(offset, memoryview(bytes(length)), align, own)
        else:
            if offset < head:
                await self._write_aligned(offset, memoryview(bytes(head - offset)), align, own)
            if head < tail:
                await self.driver.write_zeroes(head, tail - head, unmap, own)
            if tail < end:
                await self._write_aligned(tail, memoryview(bytes(end - tail)), align, own)
        if flags and _layers_fua(flags, own):
            await self.driver.flush()

    async def truncate(self, length: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"node '{self.name}' is read-only")
        if length < 0:
            raise BlockError(errno.EINVAL, f"node '{self.name}': negative size {length}")
        await self._requests.run(None, 0, self.driver.truncate, length)
        await self.refresh_size()

    async def block_status(self, offset: int, length: int) -> Extent:
        self._check(offset, length)
        return await self.driver.block_status(offset, length)


def _layers_fua(flags: WriteFlags, own: WriteFlags) -> bool:
    """Whether FUA was asked and the driver left it to the layer (a flush after the write)."""
    return bool(flags & WriteFlags.FUA) and not own & WriteFlags.FUA
