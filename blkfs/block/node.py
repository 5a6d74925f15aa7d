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
from dataclasses import dataclass
from enum import Flag
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Callable, Mapping

import trio

from blkfs.block.driver import BlockDriver, Extent
from blkfs.block.io import Tracker, align_down, align_up, is_aligned, is_zero
from blkfs.block.options import COMMON_OPTIONS
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.block.graph import Graph


class Perm(Flag):
    """What a parent needs of its child."""

    READ = 1
    WRITE = 2
    RESIZE = 4


RW = Perm.READ | Perm.WRITE | Perm.RESIZE


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
    """An edge from a parent (node or backend) to a node, in a role, with permissions.

    Drivers talk to their children only through this object, so every child request goes
    through the child node's request path.
    """

    __slots__ = ("parent", "node", "role", "perm")

    def __init__(self, parent: str, node: Node, role: str, perm: Perm) -> None:
        self.parent = parent
        self.node = node
        self.role = role
        self.perm = perm

    @property
    def can_write(self) -> bool:
        return Perm.WRITE in self.perm

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
        self.refcnt = 1
        self.size = 0
        self.stats = NodeStats()
        self._tracker = Tracker()
        self._rmw_lock = trio.Lock()

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

    @property
    def in_flight(self) -> int:
        return self._tracker.in_flight

    # -- graph -------------------------------------------------------------------------

    def attach(self, parent: str, role: str, perm: Perm) -> Child:
        """Add a parent edge, enforcing read-only state and the single writer rule."""
        if Perm.WRITE in perm:
            if self.read_only:
                raise BlockError(errno.EROFS, f"node '{self.name}' is read-only")
            writer = next((c.parent for c in self.parents if c.can_write), None)
            if writer is not None:
                raise BlockError(errno.EBUSY,
                                 f"node '{self.name}' is already written by '{writer}'")
        edge = Child(parent, self, role, perm)
        self.parents.append(edge)
        return edge

    def detach(self, edge: Child) -> None:
        self.parents.remove(edge)

    async def open_child(self, role: str, options: dict[str, Any] | str, perm: Perm) -> Child:
        """Open (or reference, for a node name) a child in ``role``; drivers call this for
        children they open themselves, such as a backing file named in an image header."""
        child = await self.graph.open_node(options, read_only=Perm.WRITE not in perm)
        try:
            edge = child.attach(self.name, role, perm)
        except BaseException:
            await self.graph.unref(child)
            raise
        self.children[role] = edge
        return edge

    async def close_child(self, role: str) -> None:
        edge = self.children.pop(role)
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
            if align == 1 or is_aligned(offset, length, align):
                await self.driver.write(offset, view)
            else:
                await self._write_unaligned(offset, view, align)
            if offset + length > self.size:  # a growable node grew
                self.size = offset + length
            self.stats.write_ops += 1
            self.stats.write_bytes += length
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()

    async def _write_unaligned(self, offset: int, view: memoryview, align: int) -> None:
        """Read-modify-write the aligned blocks around ``view``, serialised so two unaligned
        writes into one block cannot lose each other's bytes."""
        start = align_down(offset, align)
        end = min(align_up(offset + view.nbytes, align), self.size)
        async with self._rmw_lock:
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
