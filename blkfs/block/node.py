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
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import trio

from blkfs.block.driver import BlockDriver, Extent
from blkfs.block.io import RangeLocks, Tracker, align_down, align_up, is_aligned, is_zero
from blkfs.block.options import COMMON_OPTIONS
from blkfs.block.perm import ALL, NO_PERM, Perm, Role, Use
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.block.graph import Graph


RW = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
"""What a writer of a whole disk needs: a backend with a writable medium."""


@dataclass
class NodeStats:
    """Per-node request counters (status.json shows them)."""

    read_ops: int = 0
    read_bytes: int = 0
    write_ops: int = 0
    write_bytes: int = 0
    flush_ops: int = 0
    discard_ops: int = 0
    zero_ops: int = 0
    errors: int = 0


class Child:
    """An edge from a parent (a node, or a backend) to a node: the child's name in the parent
    ("file", "backing", "root"), its :class:`Role`, and the permissions the parent holds on it
    and shares with others (set by :meth:`Graph.refresh_perms`).

    Drivers talk to their children only through this object, so every child request goes
    through the child node's request path.
    """

    __slots__ = ("parent", "label", "node", "name", "role", "perm", "shared")

    def __init__(self, parent: Node | None, label: str, node: Node, name: str, role: Role,
                 perm: Perm = NO_PERM, shared: Perm = ALL) -> None:
        self.parent = parent
        """The parent node; None for a backend's root edge, whose permissions are set by
        the backend."""
        self.label = label
        self.node = node
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
        who = (f"node '{self.label}' (as its '{self.name}')" if self.parent is not None
               else self.label)
        return Use(self.perm if perm is None else perm,
                   self.shared if shared is None else shared, who)

    async def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.node.readinto(offset, memoryview(buf))
        return buf

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self.node.readinto(offset, buf)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.node.write(offset, data)

    async def flush(self) -> None:
        await self.node.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.node.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self.node.write_zeroes(offset, length, unmap)

    async def truncate(self, length: int) -> None:
        await self.node.truncate(length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.node.block_status(offset, length)


class Node:
    """One driver instance in the graph, with its request path."""

    def __init__(self, graph: Graph, name: str, driver_cls: type[BlockDriver],
                 values: Mapping[str, Any], options: Mapping[str, Any]) -> None:
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
        self.stats = NodeStats()
        self._tracker = Tracker()
        self._write_ranges = RangeLocks()

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.driver.name}>"

    @property
    def read_only(self) -> bool:
        return bool(self.values["read-only"])

    def given_options(self) -> dict[str, Any]:
        """The option values that differ from their defaults: what status shows."""
        schema = {**COMMON_OPTIONS, **self.driver.options}
        return {key: value for key, value in self.values.items()
                if value is not None and (key not in schema or value != schema[key].default)}

    def filename(self) -> str | None:
        """The host file this node's data lives in, looking through filters (QEMU's
        bs->filename): what a relative backing file name is relative to."""
        node = self
        while "filename" not in node.values:
            if not node.driver.is_filter:
                return None
            node = node.driver.filtered.node
        return str(node.values["filename"])

    @property
    def in_flight(self) -> int:
        return self._tracker.in_flight

    # -- graph -------------------------------------------------------------------------

    def attach(self, parent: Node | None, label: str, name: str, role: Role,
               perm: Perm = NO_PERM, shared: Perm = ALL) -> Child:
        """Add a parent edge. Its permissions are checked and applied by
        :meth:`Graph.refresh_perms`, which the caller runs next."""
        edge = Child(parent, label, self, name, role, perm, shared)
        self.parents.append(edge)
        return edge

    def detach(self, edge: Child) -> None:
        self.parents.remove(edge)

    async def open_child(self, name: str, options: dict[str, Any] | str, role: Role, *,
                         read_only: bool = False) -> Child:
        """Open (or reference, for a node name) a child and attach it as ``name``; drivers
        call this for children they open themselves, such as a backing file named in an
        image header (opened read-only, and never one of this node's own images: a loop).
        The child's permissions follow from ``role`` and this node's."""
        if self.values["force-share"] and isinstance(options, dict):
            options = {**options, "force-share": True}  # the children share as it does
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

    async def close_child(self, name: str) -> None:
        edge = self.children.pop(name)
        edge.node.detach(edge)
        await self.graph.unref(edge.node)

    async def refresh_size(self) -> None:
        self.size = await self.driver.length()

    def drained(self) -> AbstractAsyncContextManager[None]:
        """Hold new requests to this node and wait for those in flight (for reopen)."""
        return self._tracker.drained()

    # -- request path ------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(errno.EIO, f"node '{self.name}': request {offset}+{length} "
                                        f"is outside its {self.size} bytes")

    async def readinto(self, offset: int, buf: memoryview) -> None:
        length = buf.nbytes
        self._check(offset, length)
        await self._tracker.enter()
        try:
            align = self.driver.request_alignment
            if align == 1 or is_aligned(offset, length, align):
                await self.driver.read(offset, buf)
            else:
                start = align_down(offset, align)
                bounce = bytearray(min(align_up(offset + length, align), self.size) - start)
                await self.driver.read(start, memoryview(bounce))
                buf[:] = bounce[offset - start:offset - start + length]
            self.stats.read_ops += 1
            self.stats.read_bytes += length
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        length = view.nbytes
        self._check_write(offset, length)
        detect = self.values["detect-zeroes"]
        if detect != "off" and length and is_zero(view):
            await self.write_zeroes(offset, length, unmap=detect == "unmap")
            return
        await self._tracker.enter()
        try:
            align = self.driver.request_alignment
            if align == 1:
                await self.driver.write(offset, view)
            else:
                await self._write_aligned(offset, view, align)
            if offset + length > self.size:  # a growable node grew
                self.size = offset + length
            self.stats.write_ops += 1
            self.stats.write_bytes += length
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()

    async def _write_aligned(self, offset: int, view: memoryview, align: int) -> None:
        """Write whole ``align`` blocks, read-modify-writing the ones ``view`` covers only
        in part. Writes to overlapping blocks run one at a time, so a write landing between
        a read-modify-write's read and its write is not overwritten by the stale merge."""
        start = align_down(offset, align)
        end = min(align_up(offset + view.nbytes, align), max(self.size, offset + view.nbytes))
        async with self._write_ranges.hold(start, end - start):
            if start == offset and end == offset + view.nbytes:
                await self.driver.write(offset, view)
                return
            bounce = bytearray(end - start)
            await self.driver.read(start, memoryview(bounce))
            bounce[offset - start:offset - start + view.nbytes] = view
            await self.driver.write(start, memoryview(bounce))

    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"node '{self.name}' is read-only")
        if self.driver.growable and offset >= 0 and length >= 0:
            return
        self._check(offset, length)

    async def flush(self) -> None:
        await self._tracker.enter()
        try:
            await self.driver.flush()
            self.stats.flush_ops += 1
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()

    async def discard(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if self.values["discard"] == "ignore":
            return
        await self._run(self.driver.discard, offset, length)
        self.stats.discard_ops += 1

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_write(offset, length)
        await self._run(self.driver.write_zeroes, offset, length,
                        unmap and self.values["discard"] == "unmap")
        self.stats.zero_ops += 1

    async def truncate(self, length: int) -> None:
        if self.read_only:
            raise BlockError(errno.EROFS, f"node '{self.name}' is read-only")
        if length < 0:
            raise BlockError(errno.EINVAL, f"node '{self.name}': negative size {length}")
        await self._run(self.driver.truncate, length)
        await self.refresh_size()

    async def block_status(self, offset: int, length: int) -> Extent:
        self._check(offset, length)
        return await self.driver.block_status(offset, length)

    async def _run(self, method: Callable[..., Any], *args: Any) -> Any:
        await self._tracker.enter()
        try:
            return await method(*args)
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()
