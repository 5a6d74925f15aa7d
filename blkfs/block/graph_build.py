"""The graph's building side: trees of nodes opened from options, and closed again.

Opening is two-phase. :meth:`BuildingGraph.validate` walks the whole option tree first, so
that an unknown driver or a mistyped option fails before any file is opened; then
:meth:`~BuildingGraph.open_node` opens children before parents. If anything fails part-way,
what was opened is closed again and the graph is as it was. While a tree is being replaced,
:meth:`~BuildingGraph.open_node` reuses a node of the outgoing tree that the new options
describe exactly (and a file node of the same host file), so that a filter can be put in
front of a live image and an overlay on top of it without the image being opened twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import trio

from blkfs.block.graph_perms import HostFile, PermissionGraph, current_departure, nodes_below
from blkfs.block.node import Node
from blkfs.block.options import COMMON_OPTIONS, closest, parse_bool, unknown_option, validate
from blkfs.errors import BlockError, OptionError

log = logging.getLogger("blkfs.graph")

MAX_DEPTH = 64
"""Deepest tree (backing chain) we open; deeper is a loop or an attack."""
PROBE_BYTES = 512

_depth = contextvars.ContextVar("blkfs_open_depth", default=0)


_chain: contextvars.ContextVar[frozenset[tuple[int, int]]] = contextvars.ContextVar(
    "blkfs_chain", default=frozenset()
)
"""Host files of the images whose backing files are being opened (to find a loop)."""


class BuildingGraph(PermissionGraph):
    """A graph that opens trees of nodes from options and closes them."""

    # -- validation (no I/O) -------------------------------------------------------------

    def validate(self, options: Mapping[str, Any] | str) -> None:
        """Check a whole option tree against the drivers' schemas; raise OptionError."""
        if isinstance(options, str):
            if options not in self.nodes:
                raise BlockError(errno.ENOENT, f"no node named '{options}'")
            return
        driver = options.get("driver")
        if driver is None:
            unknown = sorted(set(options) - set(COMMON_OPTIONS) - {"file"})
            if unknown:
                known = [*COMMON_OPTIONS, "file"]
                if closest(unknown[0], known) is None:
                    raise OptionError(
                        f"option '{unknown[0]}' needs an explicit driver: "
                        "after a plain path only the common options "
                        f"({', '.join(sorted(COMMON_OPTIONS))}) may follow"
                    )
                raise OptionError(unknown_option(unknown[0], known))
            if "file" not in options:
                raise OptionError("option 'driver' is required")
            self.validate(options["file"])
            return
        if not isinstance(driver, str):
            raise OptionError(f"option 'driver' must be a string (got {driver!r})")
        cls = self.drivers.get(driver)
        checked = validate(driver, cls.options, cls.children, options)
        for role in cls.children:
            child = checked.children.get(role)
            if child is not None:
                self.validate(child)

    # -- opening -------------------------------------------------------------------------

    async def open_node(self, options: Mapping[str, Any] | str, *, read_only: bool = False) -> Node:
        """Open a tree (or take a reference on a named node) and return its root with one
        reference held by the caller."""
        if isinstance(options, str):
            node = self.find(options)
            node.refcnt += 1
            return node
        depth = _depth.get()
        if depth >= MAX_DEPTH:
            raise BlockError(
                errno.ELOOP, f"tree deeper than {MAX_DEPTH} nodes (a backing chain loop?)"
            )
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
            shares = parse_bool(tree.get("force-share", False))
        except ValueError:
            raise OptionError("options 'read-only' and 'force-share' must be on or off") from None
        if shares and isinstance(tree["file"], dict):
            tree["file"] = {**tree["file"], "force-share": True}
        file_node = await self.open_node(tree["file"], read_only=ro)
        try:
            tree["driver"] = await self.probe(file_node)
            tree["file"] = file_node.name
            return await self._open(tree, read_only, probed=True)
        finally:
            await self.unref(file_node)

    async def probe(self, file_node: Node) -> str:
        """The format of the image in ``file_node``, from its first bytes."""
        filename = str(file_node.values.get("filename", ""))
        name = self.probe_bytes(bytes(await _read_head(file_node)), filename)
        log.debug("probed %s as %s", filename or file_node.name, name)
        return name

    def probe_bytes(self, header: bytes, filename: str = "") -> str:
        """The best-scoring format for an image starting with ``header``, else raw (QEMU's
        bdrv_probe_all)."""
        scores = [(cls.probe(header, filename), cls.name) for cls in self.drivers.formats()]
        score, name = max(scores, default=(0, "raw"))
        return name if score > 0 else "raw"

    async def _open(
        self, options: Mapping[str, Any], read_only: bool, probed: bool = False
    ) -> Node:
        driver = options["driver"]
        cls = self.drivers.get(driver)
        tree = dict(options)
        if read_only:
            tree["read-only"] = True
        checked = validate(driver, cls.options, cls.children, tree)
        if checked.values["force-share"] and not checked.values["read-only"]:
            raise OptionError(
                f"{driver}: force-share=on needs read-only=on (a writer must "
                "not let others write under it)"
            )
        given_name = checked.values["node-name"]
        if not cls.children:
            reused = self._reusable(cls, checked.values, {})
            if reused is not None:
                return reused
        name = given_name or self._generate_name()
        departing = current_departure()
        clash = self.nodes.get(name)
        if name in self._reserved or (clash is not None and clash not in departing.nodes):
            raise BlockError(errno.EEXIST, f"node name '{name}' is already in use")
        if clash is not None:  # a node of the outgoing tree: the new one may take its name
            departing.shadowed[name] = self.nodes.pop(name)
        checked.values["node-name"] = name
        self._reserved.add(name)
        node = Node(self, name, cls, checked.values, tree)
        node.probed = probed
        opened = False
        try:
            for role, spec in cls.children.items():
                child_opts = checked.children.get(role)
                if spec.auto and child_opts is not None:
                    await node.open_child(role, child_opts, spec.role)
            raw_children = {
                role: checked.children[role]
                for role, spec in cls.children.items()
                if not spec.auto and role in checked.children
            }
            if cls.children and not raw_children:
                reused = self._reusable(
                    cls,
                    {**checked.values, "node-name": given_name},
                    {role: edge.node for role, edge in node.children.items()},
                )
                if reused is not None:
                    await self._close(node, opened=False)
                    return reused
            await node.driver.open(checked.values, raw_children)
            opened = True
            node.learn_limits()
            await node.refresh_size()
        except BaseException:
            await self._close(node, opened)
            raise
        finally:
            self._reserved.discard(name)
        self.nodes[name] = node
        log.debug("opened node %s (%s)", name, driver)
        return node

    def _reusable(
        self, cls: type, values: Mapping[str, Any], children: Mapping[str, Node]
    ) -> Node | None:
        """A node of the departing tree that ``values`` and ``children`` describe exactly
        (with one more reference), so that a new medium takes it over instead of opening its
        image a second time; a read-only request may take over a writable node."""
        departing = current_departure()
        for node in departing.nodes:
            named = self.nodes.get(node.name) is node or departing.shadowed.get(node.name) is node
            if type(node.driver) is not cls or not named:
                continue
            if values["node-name"] not in (None, node.name):
                continue
            if node.read_only and not values["read-only"]:
                continue
            if {role: edge.node for role, edge in node.children.items()} != dict(children):
                continue
            if not cls.same_node(node.values, values) or not node.driver.reusable():
                continue
            if departing.shadowed.get(node.name) is node:
                self.nodes[node.name] = departing.shadowed.pop(node.name)
            node.refcnt += 1
            log.debug("reusing node %s", node.name)
            return node
        return None

    async def refresh_sizes(self, top: Node) -> None:
        """Ask every node below ``top`` for its size again, children first (a host file that
        was resized behind our back)."""
        for node in reversed(nodes_below([top])):
            await node.refresh_size()

    def _generate_name(self) -> str:
        return f"#node{next(self._counter)}"

    # -- host files ----------------------------------------------------------------------

    async def open_host_file(self, node: Node, path: str, writable: bool) -> int:
        """A descriptor for the host file at ``path`` for ``node``, through the allowlist,
        opened on a worker thread (an open on a hung network or FUSE filesystem waits); the
        graph remembers who has which file open, so that two nodes cannot use one image in
        conflicting ways even where the host has no locks."""
        self._check_not_held(path)
        fd, key = await trio.to_thread.run_sync(self._open_host, path, writable)
        host = self.host_files.setdefault(key, HostFile(path))
        refusal = (
            self._held(host)
            if host.held_by
            else BlockError(errno.ELOOP, f"'{path}' is in its own backing chain (a loop)")
            if key in _chain.get()
            else None
        )
        if refusal is not None:
            if not host.nodes:
                del self.host_files[key]
            os.close(fd)
            raise refusal
        host.nodes.append(node)
        self.host_keys[node] = key
        return fd

    def _check_not_held(self, path: str) -> None:
        """Refuse a file held by calls let go before opening it: the open itself could wait
        on the device they wait on (by name; another name for it is found once open)."""
        wanted = os.path.abspath(path)
        for host in self.host_files.values():
            if host.held_by and os.path.abspath(host.path) == wanted:
                raise self._held(host)

    def _open_host(self, path: str, writable: bool) -> tuple[int, tuple[int, int]]:
        fd = self.policy.open(path, writable)
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    @staticmethod
    def _held(host: HostFile) -> BlockError:
        return BlockError(
            errno.EBUSY,
            f"'{host.path}' is still used by {host.held_by}, given up with force=on; it can be "
            "opened again once its device answers them",
        )

    def hold_host_file(self, node: Node, held_by: str) -> None:
        """Keep anyone from opening ``node``'s file until it is closed: host calls that were
        let go (``held_by`` names them) still use it."""
        self.host_files[self.host_keys[node]].held_by = held_by

    @contextlib.contextmanager
    def opening_backing_of(self, node: Node) -> Iterator[None]:
        """While the body opens ``node``'s backing chain, none of the host files ``node``
        stands on may be opened again: that would be a loop."""
        keys = {
            key
            for key, host in self.host_files.items()
            if any(n in host.nodes for n in nodes_below([node]))
        }
        token = _chain.set(_chain.get() | keys)
        try:
            yield
        finally:
            _chain.reset(token)

    def close_host_file(self, node: Node, fd: int) -> None:
        key = self.host_keys.pop(node)
        host = self.host_files.get(key)
        if host is not None and node in host.nodes:
            host.nodes.remove(node)
            if not host.nodes:
                del self.host_files[key]
        os.close(fd)

    # -- closing -------------------------------------------------------------------------

    async def unref(self, node: Node) -> None:
        """Drop one reference; the last one closes the node, then its children. A node that
        stays gives up the permissions its departed parents needed."""
        node.refcnt -= 1
        if node.refcnt > 0:
            self.refresh_perms([node])
            return
        if self.nodes.get(node.name) is node:  # a new node may have taken its name
            del self.nodes[node.name]
        await self._close(node, opened=True)
        log.debug("closed node %s", node.name)

    async def _close(self, node: Node, opened: bool) -> None:
        try:
            if opened:
                await node.driver.close()
        finally:
            for role in list(node.children):
                await node.close_child(role)


async def _read_head(node: Node) -> bytearray:
    length = min(node.size, PROBE_BYTES)
    buf = bytearray(length)
    if length:
        await node.readinto(0, memoryview(buf))
    return buf
