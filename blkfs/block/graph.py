"""The graph: builds trees of nodes from options, names them, and frees them.

Opening is two-phase. :meth:`Graph.validate` walks the whole option tree first, so that an
unknown driver or a mistyped option fails before any file is opened; then :meth:`open_node`
opens children before parents. If anything fails part-way, what was opened is closed again
and the graph is as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import itertools
import logging
from typing import Any, Mapping

import trio

from blkfs.block.node import RW, Child, Node, Perm
from blkfs.block.options import COMMON_OPTIONS, list_options, parse_bool, validate
from blkfs.block.policy import HostPolicy
from blkfs.block.registry import DriverRegistry, default_registry
from blkfs.errors import BlockError, OptionError

log = logging.getLogger("blkfs.graph")

MAX_DEPTH = 64
"""Deepest tree (backing chain) we open; deeper is a loop or an attack."""
PROBE_BYTES = 512

_depth = contextvars.ContextVar("blkfs_open_depth", default=0)


class Graph:
    """All nodes of one blkfs instance, by name."""

    def __init__(self, drivers: DriverRegistry | None = None,
                 policy: HostPolicy | None = None) -> None:
        self.drivers = drivers or default_registry()
        self.policy = policy or HostPolicy()
        self.nodes: dict[str, Node] = {}
        self._reserved: set[str] = set()
        self._counter = itertools.count()
        self._probed_raw: set[str] = set()

    def find(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise BlockError(errno.ENOENT, f"no node named '{name}'")
        return node

    # -- validation (no I/O) -------------------------------------------------------------

    def validate(self, options: Mapping[str, Any] | str) -> None:
        """Check a whole option tree against the drivers' schemas; raise OptionError."""
        if isinstance(options, str):
            if options not in self.nodes:
                raise BlockError(errno.ENOENT, f"no node named '{options}'")
            return
        driver = options.get("driver")
        if driver is None:
            unknown = set(options) - set(COMMON_OPTIONS) - {"file"}
            if unknown:
                raise OptionError(f"options {', '.join(sorted(unknown))} need an explicit "
                                  "driver (the format is only probed for a plain path)")
            if "file" not in options:
                raise OptionError("option 'driver' is required")
            self.validate(options["file"])
            return
        if not isinstance(driver, str):
            raise OptionError(f"option 'driver' must be a string (got {driver!r})")
        cls = self.drivers.get(driver)
        checked = validate(driver, cls.options, cls.children, options)
        for role, spec in cls.children.items():
            child = checked.children.get(role)
            if child is not None:
                self.validate(child)

    # -- opening -------------------------------------------------------------------------

    async def open_node(self, options: Mapping[str, Any] | str, *,
                        read_only: bool = False) -> Node:
        """Open a tree (or take a reference on a named node) and return its root with one
        reference held by the caller."""
        if isinstance(options, str):
            node = self.find(options)
            node.refcnt += 1
            return node
        depth = _depth.get()
        if depth >= MAX_DEPTH:
            raise BlockError(errno.ELOOP,
                             f"tree deeper than {MAX_DEPTH} nodes (a backing chain loop?)")
        token = _depth.set(depth + 1)
        try:
            if options.get("driver") is None:
                return await self._open_probed(options, read_only)
            return await self._open(options, read_only)
        finally:
            _depth.reset(token)

    async def _open_probed(self, options: Mapping[str, Any], read_only: bool) -> Node:
        """Open the file first, choose the format from its first bytes, then open that."""
        if "file" not in options:
            raise OptionError("option 'driver' is required")
        tree = dict(options)
        try:
            ro = read_only or parse_bool(tree.get("read-only", False))
        except ValueError:
            raise OptionError(f"option 'read-only' must be on or off "
                              f"(got {tree['read-only']!r})") from None
        file_node = await self.open_node(tree["file"], read_only=ro)
        try:
            tree["driver"] = await self.probe(file_node)
            tree["file"] = file_node.name
            return await self._open(tree, read_only)
        finally:
            await self.unref(file_node)

    async def probe(self, file_node: Node) -> str:
        """The format of the image in ``file_node``: the best-scoring format driver, else raw
        (and once opened as raw, always raw for that file: a guest writing a qcow2 header into
        a raw image must not turn it into a qcow2 next time)."""
        header = bytes(await _read_head(file_node))
        filename = str(file_node.values.get("filename", ""))
        if filename and self.policy.key(filename) in self._probed_raw:
            return "raw"
        scores = [(cls.probe(header, filename), cls.name) for cls in self.drivers.formats()]
        score, name = max(scores, default=(0, "raw"))
        if score <= 0:
            name = "raw"
        log.debug("probed %s as %s", filename or file_node.name, name)
        return name

    async def _open(self, options: Mapping[str, Any], read_only: bool) -> Node:
        driver = options["driver"]
        cls = self.drivers.get(driver)
        tree = dict(options)
        if read_only:
            tree["read-only"] = True
        checked = validate(driver, cls.options, cls.children, tree)
        name = checked.values["node-name"] or self._generate_name()
        if name in self.nodes or name in self._reserved:
            raise BlockError(errno.EEXIST, f"node name '{name}' is already in use")
        checked.values["node-name"] = name
        self._reserved.add(name)
        node = Node(self, name, cls, checked.values, tree)
        child_perm = Perm.READ if node.read_only else RW
        opened = False
        try:
            for role, spec in cls.children.items():
                child_opts = checked.children.get(role)
                if spec.auto and child_opts is not None:
                    await node.open_child(role, child_opts, child_perm)
            raw_children = {role: checked.children[role] for role, spec in cls.children.items()
                            if not spec.auto and role in checked.children}
            await node.driver.open(checked.values, raw_children)
            opened = True
            await node.refresh_size()
        except BaseException:
            await self._close(node, opened)
            raise
        finally:
            self._reserved.discard(name)
        self.nodes[name] = node
        if driver == "raw" and "file" in node.children:  # probed or chosen, raw stays raw
            filename = node.children["file"].node.values.get("filename")
            if filename:
                self._probed_raw.add(self.policy.key(filename))
        log.debug("opened node %s (%s)", name, driver)
        return node

    async def reopen(self, name: str, options: Mapping[str, Any]) -> None:
        """Change the options of a live node atomically (QEMU's blockdev-reopen).

        Options not given keep their current values, except that a list option given at all
        (``inject-error.0.event=...``, or ``inject-error=none``) replaces the whole list;
        children and the driver cannot be changed. The node is drained (unless its driver
        applies changes between requests itself, as filters whose requests may wait do), then
        its driver applies the new values or raises and changes nothing.

        ``read-only`` switches the node together with the children it writes through (its
        ``auto`` children, recursively; a backing file stays read-only), as QEMU's reopen
        does for children that inherit it. Making a node read-only flushes it first, and is
        refused while a parent outside that subtree writes to it.
        """
        node = self.find(name)
        cls = type(node.driver)
        tree = dict(options)
        if tree.pop("driver", cls.name) != cls.name:
            raise OptionError(f"reopen: node '{name}' is a {cls.name} node; "
                              "its driver cannot be changed")
        if tree.get("node-name", name) != name:
            raise OptionError(f"reopen: node '{name}' cannot be renamed")
        changed_children = set(tree) & set(cls.children)
        if changed_children:
            raise OptionError(f"reopen: children cannot be changed ({', '.join(changed_children)})")
        given = validate(cls.name, cls.options, cls.children, tree, partial=True).values
        replaced = tuple(f"{name}." for name in list_options(cls.options) if name in tree)
        values = {key: value for key, value in node.values.items()
                  if not key.startswith(replaced)}
        values.update(given)
        if values["read-only"] != node.read_only:
            async with node.drained():
                await self._switch_read_only(node, values)
        else:
            async with node.drained() if node.driver.reopen_drains else contextlib.nullcontext():
                await node.driver.reopen(values)
                node.values = values
        log.info("reopened node %s", name)

    async def _switch_read_only(self, top: Node, values: dict[str, Any]) -> None:
        """Reopen ``top`` with ``values`` and its write path with the new read-only flag,
        all or nothing: writers switch bottom-up (a child is writable before its parent
        writes), read-only top-down (a parent writes back its caches first)."""
        read_only = bool(values["read-only"])
        path, edges = _write_path(top)
        if read_only:
            for node in path:
                writer = next((edge.parent for edge in node.parents if edge.can_write
                               and edge not in edges and edge.role != "root"), None)
                if writer is not None:
                    raise BlockError(errno.EBUSY, f"reopen: node '{node.name}' is written by "
                                                  f"'{writer}'; reopen that read-only first")
        else:  # the new writer must be the only user of what it will write
            others = [edge.parent for edge in top.parents if edge.role != "root"]
            if others or len(top.parents) > 1:
                raise BlockError(errno.EBUSY, f"reopen: node '{top.name}' is used by "
                                              f"{', '.join(others) or 'several backends'}; "
                                              "only a node with one user can become writable")
            for node in path[1:]:
                other = next((edge.parent for edge in node.parents if edge not in edges), None)
                if other is not None:
                    raise BlockError(errno.EBUSY, f"reopen: node '{node.name}' is also used "
                                                  f"by '{other}'")
        if read_only:
            await top.driver.flush()  # the node is drained: its own request path is closed
        done: list[tuple[Node, dict[str, Any]]] = []
        try:
            for node in path if read_only else path[::-1]:
                new = values if node is top else {**node.values, "read-only": read_only}
                await node.driver.reopen(new)
                done.append((node, node.values))
                node.values = new
                await node.refresh_size()
        except BaseException:
            with trio.CancelScope(shield=True):
                for node, old in reversed(done):
                    try:
                        await node.driver.reopen(old)
                        node.values = old
                    except BlockError as exc:
                        log.error("reopen: node %s could not be switched back: %s",
                                  node.name, exc.message)
            raise
        for edge in edges:
            edge.perm = Perm.READ if read_only else RW

    def _generate_name(self) -> str:
        return f"#node{next(self._counter)}"

    # -- closing -------------------------------------------------------------------------

    async def unref(self, node: Node) -> None:
        """Drop one reference; the last one closes the node, then its children."""
        node.refcnt -= 1
        if node.refcnt > 0:
            return
        self.nodes.pop(node.name, None)
        await self._close(node, opened=True)
        log.debug("closed node %s", node.name)

    async def _close(self, node: Node, opened: bool) -> None:
        try:
            if opened:
                await node.driver.close()
        finally:
            for role in list(node.children):
                await node.close_child(role)


def _write_path(top: Node) -> tuple[list[Node], list[Child]]:
    """``top`` and the nodes it writes through (``auto`` children, recursively), top-down,
    with the edges that lead to them."""
    path, edges = [top], []
    for node in path:
        specs = type(node.driver).children
        for role, edge in node.children.items():
            if specs[role].auto and edge.node not in path:
                path.append(edge.node)
                edges.append(edge)
    return path, edges


async def _read_head(node: Node) -> bytearray:
    length = min(node.size, PROBE_BYTES)
    buf = bytearray(length)
    if length:
        await node.readinto(0, memoryview(buf))
    return buf
