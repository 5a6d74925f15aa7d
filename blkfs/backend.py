"""The block backend API: everything a frontend may touch (QEMU's BlockBackend).

A :class:`BlockBackend` is a named, reference-counted root that stays put while media come
and go beneath it. Frontends (FUSE, ``.ctl``, the CLI) use only this module and
:mod:`blkfs.errors`; they never see a node. The backend checks every request once (medium
present, range, read-only state), counts it for drain and statistics, and hands it to the
root node.

Graph changes (insert, eject, change, delete) drain the backend first: new requests wait, the
ones in flight finish, the tree is replaced, then the waiting requests run against the new
medium. A change that fails leaves the old medium untouched.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping

import trio

from blkfs.block.graph import Graph
from blkfs.block.io import Tracker
from blkfs.block.node import RW, Child, Node, Perm
from blkfs.block.options import format_options, parse_options
from blkfs.block.policy import HostPolicy
from blkfs.errors import BlockError, OptionError

__all__ = ["BlockBackend", "BlockError", "BlockLayer", "OptionError", "parse_options"]

log = logging.getLogger("blkfs.backend")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,127}$")
Listener = Callable[["BlockBackend", str], None]
"""Called with the backend and the event: 'medium', 'size' or 'delete'."""
Options = str | Mapping[str, Any]


@dataclass
class BackendStats:
    """Per-backend counters, like QMP's query-blockstats."""

    read_ops: int = 0
    read_bytes: int = 0
    read_ns: int = 0
    write_ops: int = 0
    write_bytes: int = 0
    write_ns: int = 0
    flush_ops: int = 0
    flush_ns: int = 0
    discard_ops: int = 0
    discard_bytes: int = 0
    discard_ns: int = 0
    errors: int = 0


class BlockBackend:
    """A named root: the unit frontends open, read, write and change media on."""

    def __init__(self, layer: BlockLayer, name: str, read_only: bool = False) -> None:
        self.layer = layer
        self.name = name
        self.refcnt = 1
        self.stats = BackendStats()
        self._root: Child | None = None
        self._read_only = read_only
        self._tracker = Tracker()
        self._graph_lock = trio.Lock()
        self._listeners: list[Listener] = []
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

    def set_read_only(self, read_only: bool) -> None:
        """The read-only switch; a medium opened read-only cannot be made writable here."""
        if not read_only and self._root is not None and not self._root.can_write:
            raise BlockError(errno.EROFS, f"{self.name}: the medium was opened read-only; "
                                          "change it with read-only=off to write")
        self._read_only = read_only

    def on_change(self, listener: Listener) -> None:
        """Register a callback for medium, size and delete events (cache invalidation)."""
        self._listeners.append(listener)

    def _notify(self, event: str) -> None:
        self.changed_ns = time.time_ns()
        for listener in list(self._listeners):
            listener(self, event)

    # -- references ----------------------------------------------------------------------

    def ref(self) -> None:
        self.refcnt += 1

    async def unref(self) -> None:
        """Drop a reference; the last one drains, flushes and closes the medium."""
        self.refcnt -= 1
        if self.refcnt == 0:
            async with self._graph_lock, self._tracker.drained():
                await self._close_medium()
            log.info("%s: closed", self.name)

    # -- I/O -----------------------------------------------------------------------------

    def _medium(self) -> Node:
        if self._root is None:
            raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium")
        return self._root.node

    def _check_range(self, node: Node, offset: int, length: int, write: bool) -> None:
        if offset < 0 or length < 0:
            raise BlockError(errno.EINVAL, f"{self.name}: negative offset or length")
        if offset + length > node.size:
            raise BlockError(errno.ENOSPC if write else errno.EIO,
                             f"{self.name}: {offset}+{length} is past the end ({node.size})")

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
        await self._tracker.enter()
        start = time.perf_counter_ns()
        length = buf.nbytes
        try:
            node = self._medium()
            self._check_range(node, offset, length, write=False)
            await node.readinto(offset, buf)
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()
        stats = self.stats
        stats.read_ops += 1
        stats.read_bytes += length
        stats.read_ns += time.perf_counter_ns() - start

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``; past the end is ENOSPC, as on a disk."""
        await self._tracker.enter()
        start = time.perf_counter_ns()
        length = len(data)
        try:
            node = self._medium()
            self._check_write(node, offset, length)
            await node.write(offset, data)
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()
        stats = self.stats
        stats.write_ops += 1
        stats.write_bytes += length
        stats.write_ns += time.perf_counter_ns() - start

    async def flush(self) -> None:
        """Make every acknowledged write durable in the host files."""
        await self._tracker.enter()
        start = time.perf_counter_ns()
        try:
            if self._root is not None:
                await self._root.node.flush()
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()
        self.stats.flush_ops += 1
        self.stats.flush_ns += time.perf_counter_ns() - start

    async def discard(self, offset: int, length: int) -> None:
        await self._zero_or_discard(offset, length, None)

    async def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        await self._zero_or_discard(offset, length, unmap)

    async def _zero_or_discard(self, offset: int, length: int, unmap: bool | None) -> None:
        await self._tracker.enter()
        start = time.perf_counter_ns()
        try:
            node = self._medium()
            self._check_write(node, offset, length)
            if unmap is None:
                await node.discard(offset, length)
            else:
                await node.write_zeroes(offset, length, unmap)
        except BaseException:
            self.stats.errors += 1
            raise
        finally:
            self._tracker.leave()
        self.stats.discard_ops += 1
        self.stats.discard_bytes += length
        self.stats.discard_ns += time.perf_counter_ns() - start

    async def truncate(self, length: int) -> None:
        """Resize the medium if its tree can; the size listeners hear of it."""
        async with self._graph_lock, self._tracker.drained():
            node = self._medium()
            if self.read_only:
                raise BlockError(errno.EROFS, f"{self.name}: read-only medium")
            await node.truncate(length)
        log.info("%s: resized to %d bytes", self.name, length)
        self._notify("size")

    async def allocated_bytes(self) -> int | None:
        """Host bytes the medium's image takes, if its tree knows."""
        if self._root is None:
            return 0
        return await self._root.node.driver.allocated_bytes()

    def touch(self) -> None:
        """Record that contents changed (the frontend calls this after writes it served)."""
        self.changed_ns = time.time_ns()

    # -- media ---------------------------------------------------------------------------

    async def insert(self, options: Options) -> None:
        """Insert a medium into an empty backend."""
        tree = self.layer.parse(options)
        async with self._graph_lock:
            if self._root is not None:
                raise BlockError(errno.EBUSY, f"{self.name}: already has a medium "
                                              "(use change to replace it, or eject first)")
            async with self._tracker.drained():
                self._root = await self._open_medium(tree)
        log.info("%s: inserted %s", self.name, format_options(tree))
        self._notify("medium")

    async def eject(self) -> None:
        """Remove the medium: drain, flush, close. The backend stays, with size 0."""
        async with self._graph_lock:
            if self._root is None:
                raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium to eject")
            async with self._tracker.drained():
                await self._close_medium()
        log.info("%s: ejected", self.name)
        self._notify("medium")

    async def change(self, options: Options) -> None:
        """Replace the medium atomically; on an empty backend this is insert.

        The new tree is built fully, the old medium flushed, and only then are they swapped;
        if building or flushing fails, the old medium stays as it was.
        """
        tree = self.layer.parse(options)
        async with self._graph_lock, self._tracker.drained():
            new = await self._open_medium(tree)
            old = self._root
            if old is not None:
                try:
                    await old.node.flush()
                except BaseException:
                    await self._release(new)
                    raise
            self._root = new
            if old is not None:
                await self._release(old)
        log.info("%s: changed medium to %s", self.name, format_options(tree))
        self._notify("medium")

    async def _open_medium(self, tree: Mapping[str, Any]) -> Child:
        graph = self.layer.graph
        node = await graph.open_node(tree, read_only=self._read_only)
        try:
            return node.attach(self.name, "root", Perm.READ if node.read_only else RW)
        except BaseException:
            await graph.unref(node)
            raise

    async def _close_medium(self) -> None:
        root, self._root = self._root, None
        if root is not None:
            try:
                await root.node.flush()
            finally:
                await self._release(root)

    async def _release(self, edge: Child) -> None:
        edge.node.detach(edge)
        await self.layer.graph.unref(edge.node)

    # -- status --------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Everything status files show of this backend, as plain data."""
        return {
            "name": self.name,
            "medium": self.has_medium,
            "read-only": self.read_only,
            "size": self.length(),
            "allocated": await self.allocated_bytes(),
            "refs": self.refcnt,
            "stats": asdict(self.stats),
            "tree": _describe(self._root.node) if self._root else None,
        }


def _describe(node: Node) -> dict[str, Any]:
    """A node and its subtree as plain data (status, status.json)."""
    return {
        "node-name": node.name,
        "driver": node.driver.name,
        "read-only": node.read_only,
        "size": node.size,
        "options": node.given_options(),
        "info": node.driver.info(),
        "stats": asdict(node.stats),
        "children": {role: _describe(edge.node) for role, edge in node.children.items()},
    }


class BlockLayer:
    """The registry of backends of one blkfs instance, over one graph of nodes."""

    def __init__(self, image_dirs: list[str] | None = None) -> None:
        self.graph = Graph(policy=HostPolicy(image_dirs))
        self._backends: dict[str, BlockBackend] = {}

    @property
    def image_dirs(self) -> tuple[str, ...] | None:
        return self.graph.policy.image_dirs

    def parse(self, options: Options) -> dict[str, Any]:
        """Parse (if text) and validate options for a medium; OptionError if they are bad."""
        tree = parse_options(options) if isinstance(options, str) else dict(options)
        self.graph.validate(tree)
        return tree

    def __iter__(self) -> Iterator[BlockBackend]:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def __contains__(self, name: str) -> bool:
        return name in self._backends

    def find(self, name: str) -> BlockBackend:
        backend = self._backends.get(name)
        if backend is None:
            raise BlockError(errno.ENOENT, f"no backend named '{name}'")
        return backend

    async def create(self, name: str, options: Options | None = None, *,
                     read_only: bool = False) -> BlockBackend:
        """A new backend, with a medium from ``options`` or empty; nothing is left behind
        if the medium cannot be opened."""
        if not NAME_RE.match(name):
            raise BlockError(errno.EINVAL,
                             f"invalid backend name '{name}': use letters, digits and _.+:- "
                             "(not starting with . or -), at most 128 characters")
        if name in self._backends:
            raise BlockError(errno.EEXIST, f"a backend named '{name}' already exists")
        backend = BlockBackend(self, name, read_only)
        self._backends[name] = backend  # reserve the name while the medium opens
        try:
            if options is not None:
                await backend.insert(options)
        except BaseException:
            del self._backends[name]
            raise
        log.info("%s: created", name)
        return backend

    async def delete(self, name: str) -> None:
        """Remove the name; the backend lives on while references remain. When the name is
        the last reference, the medium is flushed first, so a flush that fails (a full host
        disk) fails the delete and changes nothing."""
        backend = self.find(name)
        if backend.refcnt == 1 and backend.has_medium:
            await backend.flush()
            if self._backends.get(name) is not backend:  # deleted meanwhile
                raise BlockError(errno.ENOENT, f"no backend named '{name}'")
        await self._drop(backend)

    async def _drop(self, backend: BlockBackend) -> None:
        name = backend.name
        del self._backends[name]
        log.info("%s: deleted", name)
        backend._notify("delete")
        await backend.unref()

    async def reopen(self, node_name: str, options: Options) -> None:
        """Change the options of a live node atomically (QEMU's blockdev-reopen)."""
        tree = parse_options(options) if isinstance(options, str) else dict(options)
        await self.graph.reopen(node_name, tree)
        log.info("node %s: reopened with %s", node_name, format_options(tree))
        node = self.graph.find(node_name)
        for backend in self:
            if backend._root is not None and backend._root.node is node:
                # a backend follows its root node's read-only flag, switch included
                backend._root.perm = Perm.READ if node.read_only else RW
                backend._read_only = node.read_only
            if backend._root is not None:
                backend._notify("medium")

    async def close(self) -> None:
        """Shut down: drop every backend (each drains, flushes and closes when free). One
        that fails to flush is logged and closed anyway; the others still close cleanly."""
        for backend in list(self._backends.values()):
            try:
                await self._drop(backend)
            except BlockError as exc:
                log.error("%s: closed, but the final flush failed: %s", backend.name,
                          exc.message)
            except Exception:  # a bug: say so, and still close the others
                log.exception("%s: closing failed", backend.name)

    async def status(self) -> list[dict[str, Any]]:
        return [await b.status() for b in self]
