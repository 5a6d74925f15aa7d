"""The graph: builds trees of nodes from options, names them, and frees them.

Opening is two-phase. :meth:`Graph.validate` walks the whole option tree first, so that an
unknown driver or a mistyped option fails before any file is opened; then :meth:`open_node`
opens children before parents. If anything fails part-way, what was opened is closed again
and the graph is as it was.

Permissions (:mod:`blkfs.block.perm`) are recomputed by :meth:`Graph.refresh_perms` whenever
an edge comes or goes, all or nothing, as QEMU's bdrv_refresh_perms does: a conflict between
two users of a node, a writer of a read-only node, or two nodes whose uses of one host file
conflict fail the change that caused it. While a backend replaces its medium, the edges of
the outgoing tree are :class:`Departure`: they do not count, and nodes of that tree may be
taken over by the new one (:meth:`open_node` reuses a node that the new options describe
exactly, and a file node of the same host file), so that a filter can be put in front of a
live image and an overlay on top of it without the image being opened twice.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from blkfs.block.node import Child, Node
from blkfs.block.options import (
    COMMON_OPTIONS,
    closest,
    list_options,
    parse_bool,
    unknown_option,
    validate,
)
from blkfs.block.perm import (
    ALL,
    WRITERS,
    Perm,
    Role,
    Use,
    conflict,
    conflicting,
    cumulative,
)
from blkfs.block.policy import HostPolicy
from blkfs.block.registry import DriverRegistry, default_registry
from blkfs.errors import BlockError, NotFound, OptionError

log = logging.getLogger("blkfs.graph")

MAX_DEPTH = 64
"""Deepest tree (backing chain) we open; deeper is a loop or an attack."""
PROBE_BYTES = 512
NAMED_USERS = 5
"""Most users a refusal names (a base may have a thousand overlays)."""

_depth = contextvars.ContextVar("blkfs_open_depth", default=0)


@dataclass(frozen=True)
class Departure:
    """The part of the graph that goes when an edge is dropped: the edge, the nodes that then
    close, and their edges to their children; and the names of departing nodes that a new
    node took meanwhile (given back if the change fails)."""

    edges: frozenset[Child] = frozenset()
    nodes: frozenset[Node] = frozenset()
    shadowed: dict[str, Node] = field(default_factory=dict, compare=False)


_departing: contextvars.ContextVar[Departure | None] = contextvars.ContextVar(
    "blkfs_departing", default=None
)


def _departure() -> Departure:
    """The departing part of the graph while a medium changes; nothing otherwise."""
    return _departing.get() or Departure()


_chain: contextvars.ContextVar[frozenset[tuple[int, int]]] = contextvars.ContextVar(
    "blkfs_chain", default=frozenset()
)
"""Host files of the images whose backing files are being opened (to find a loop)."""


@dataclass
class HostFile:
    """One host file and the nodes that have it open."""

    path: str
    nodes: list[Node] = field(default_factory=list)
    held_by: str | None = None
    """Set while host calls let go with force=on still use the file (see
    :meth:`Graph.hold_host_file`): nobody may open it meanwhile."""


class Graph:
    """All nodes of one blkfs instance, by name."""

    def __init__(
        self, drivers: DriverRegistry | None = None, policy: HostPolicy | None = None
    ) -> None:
        self.drivers = drivers or default_registry()
        self.policy = policy or HostPolicy()
        self.nodes: dict[str, Node] = {}
        self._reserved: set[str] = set()
        self._counter = itertools.count()
        self.host_files: dict[tuple[int, int], HostFile] = {}
        """Open host files by (device, inode), to find two nodes using one image."""
        self._host_keys: dict[int, tuple[int, int]] = {}
        """The (device, inode) of each descriptor :meth:`open_host_file` gave out: closing
        one must not ask the host (a hung device would hang the fstat)."""
        self.registries: dict[str, dict[str, Any]] = {}
        """What drivers share between the nodes of this graph (throttle groups), by kind."""

    def registry(self, kind: str) -> dict[str, Any]:
        """What the nodes of this graph share, by kind (throttle groups, running jobs)."""
        return self.registries.setdefault(kind, {})

    def find(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise NotFound("node", name, f"no node named '{name}'")
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
        departing = _departure()
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
        departing = _departure()
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
            raise OptionError(
                f"reopen: node '{name}' is a {cls.name} node; its driver cannot be changed"
            )
        if tree.get("node-name", name) != name:
            raise OptionError(f"reopen: node '{name}' cannot be renamed")
        changed_children = set(tree) & set(cls.children)
        if changed_children:
            raise OptionError(f"reopen: children cannot be changed ({', '.join(changed_children)})")
        given = validate(cls.name, cls.options, cls.children, tree, partial=True).values
        replaced = tuple(f"{name}." for name in list_options(cls.options) if name in tree)
        values = {key: value for key, value in node.values.items() if not key.startswith(replaced)}
        values.update(given)
        if values["read-only"] != node.read_only:
            async with node.drained():
                await self._switch_read_only(node, values)
        else:
            async with node.drained() if node.driver.reopen_drains else contextlib.nullcontext():
                await node.driver.reopen(values)
                node.values = values
        for above in _above(node):  # a filter's limits follow the node below it
            above.learn_limits()
        log.info("reopened node %s", name)

    async def _switch_read_only(self, top: Node, values: dict[str, Any]) -> None:
        """Reopen ``top`` with ``values`` and its write path with the new read-only flag,
        all or nothing: writers switch bottom-up (a child is writable before its parent
        writes), read-only top-down (a parent writes back its caches first). The permissions
        of the new state are checked before anything switches; a node becoming writable
        takes its image locks first, one becoming read-only drops them last."""
        read_only = bool(values["read-only"])
        path, edges = _write_path(top)
        if read_only:
            for node in path:
                writer = next(
                    (
                        edge.label
                        for edge in node.parents
                        if edge.can_write and edge not in edges and edge.parent is not None
                    ),
                    None,
                )
                if writer is not None:
                    raise BlockError(
                        errno.EBUSY,
                        f"reopen: node '{node.name}' is written by "
                        f"'{writer}'; reopen that read-only first",
                    )
        else:  # the new writer must be the only user of what it will write; an overlay
            # only reads its backing file, and its permissions say whether it lets others
            # write it (a commit job writes only what the overlay shows already)
            others = [
                edge.label
                for edge in top.parents
                if edge.parent is not None and Role.COW not in edge.role
            ]
            if others or len(top.parents) > 1:
                raise BlockError(
                    errno.EBUSY,
                    f"reopen: node '{top.name}' is used by "
                    f"{', '.join(others) or 'several backends'}; "
                    "only a node with one user can become writable",
                )
            for node in path[1:]:
                other = next((edge.label for edge in node.parents if edge not in edges), None)
                if other is not None:
                    raise BlockError(
                        errno.EBUSY, f"reopen: node '{node.name}' is also used by '{other}'"
                    )
        plan = self._plan_perms([top], read_only={node: read_only for node in path})
        if not read_only:
            self._apply_perms(plan)
        else:
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
                        log.error(
                            "reopen: node %s could not be switched back: %s", node.name, exc.message
                        )
                self.refresh_perms([top])
            raise
        if read_only:
            self._apply_perms(plan)

    # -- permissions ---------------------------------------------------------------------

    def refresh_perms(self, start: Iterable[Node]) -> None:
        """Recompute, check and apply the permissions of ``start`` and every node below it,
        all or nothing; BlockError (EBUSY, EROFS) names the conflict, and then nothing
        changed."""
        self._apply_perms(self._plan_perms(start))

    def _plan_perms(
        self, start: Iterable[Node], read_only: Mapping[Node, bool] | None = None
    ) -> _PermPlan:
        """The permissions of every edge and node below ``start`` (as if the nodes in
        ``read_only`` had that flag), checked: two uses of one node, a writer of a read-only
        node, two nodes' uses of one host file."""
        departing = _departure()
        flags = read_only or {}
        plan = _PermPlan()
        for node in _below(start):
            parents = [edge for edge in node.parents if edge not in departing.edges]
            uses = [edge.use(*plan.edges.get(edge, (None, None))) for edge in parents]
            perm, shared = cumulative(uses)
            writable = not flags.get(node, node.read_only)
            if perm & WRITERS and not writable:
                writer = next(use.who for use in uses if use.perm & WRITERS)
                raise BlockError(
                    errno.EROFS, f"node '{node.name}' is read-only, but {writer} needs to write it"
                )
            writers = [use.who for use in uses if Perm.WRITE in use.perm]
            # one writer per node, where QEMU shares (docs/design.md, "Permissions between nodes")
            if len(writers) > 1:
                raise BlockError(
                    errno.EBUSY,
                    f"node '{node.name}' is already written by "
                    f"{writers[0]}; {writers[1]} cannot write it too",
                )
            pair = conflicting(uses)
            if pair is not None:
                a, b = pair
                missing = a.perm & ~b.shared
                refusing = [
                    edge
                    for edge, use in zip(parents, uses, strict=True)
                    if use is not a and missing & ~use.shared
                ]
                refusers, backing = _refusers(plan, refusing, missing)
                if all(edge.parent is None for edge in refusing):
                    refusers = []  # b names them
                filename = node.filename()
                what = f"node '{node.name}'" + (f" ('{filename}')" if filename else "")
                raise BlockError(
                    errno.EBUSY,
                    _refusal(
                        what,
                        a.who,
                        missing,
                        refusers,
                        backing,
                        f"node '{node.name}': {conflict([a, b])}",
                    ),
                )
            plan.nodes[node] = (perm, shared)
            for edge in node.children.values():
                nperm, nshared = node.driver.child_perm(edge, writable, perm, shared)
                plan.edges[edge] = nperm, ALL if edge.node.values["force-share"] else nshared
        for host in self.host_files.values():
            users = [n for n in host.nodes if n not in departing.nodes]
            if len(users) > 1 and any(n in plan.nodes for n in users):
                uses = [
                    Use(*plan.nodes.get(n, (n.perm, n.shared)), f"node '{n.name}'") for n in users
                ]
                pair = conflicting(uses)
                if pair is not None:
                    a, b = pair
                    a_node = next(n for n, use in zip(users, uses, strict=True) if use is a)
                    missing = a.perm & ~b.shared
                    refusing = [
                        edge
                        for n, use in zip(users, uses, strict=True)
                        if use is not a and missing & ~use.shared
                        for edge in _live(n.parents, departing)
                    ]
                    refusers, backing = _refusers(plan, refusing, missing)
                    needers = _needers(plan, _live(a_node.parents, departing), missing)
                    raise BlockError(
                        errno.EBUSY,
                        _refusal(
                            f"'{host.path}'",
                            ", ".join(needers) or a.who,
                            missing,
                            refusers,
                            backing,
                            f"'{host.path}' is in use: {conflict([a, b])}",
                        ),
                    )
        return plan

    def _apply_perms(self, plan: _PermPlan) -> None:
        """Take the host locks the plan needs (all or none), then record it."""
        prepared: list[Node] = []
        try:
            for node, (perm, shared) in plan.nodes.items():
                node.driver.check_perm(perm, shared)
                prepared.append(node)
        except BaseException:
            for node in prepared:
                node.driver.abort_perm()
            raise
        for edge, (perm, shared) in plan.edges.items():
            edge.perm, edge.shared = perm, shared
        for node, (perm, shared) in plan.nodes.items():
            node.perm, node.shared = perm, shared
            node.driver.set_perm(perm, shared)

    @contextlib.contextmanager
    def departing(self, edge: Child, shadowed: dict[str, Node]) -> Iterator[Departure]:
        """While the body runs, ``edge`` and what would close without it do not count in
        permissions, and :meth:`open_node` may take over its nodes or their names (a medium
        change); the names it takes are noted in ``shadowed``, for :meth:`unshadow`."""
        departure = self.departure(edge, shadowed)
        token = _departing.set(departure)
        try:
            yield departure
        finally:
            _departing.reset(token)

    def unshadow(self, shadowed: dict[str, Node]) -> None:
        """A change failed: departing nodes get back the names new nodes had taken."""
        for name, node in shadowed.items():
            if node.refcnt and name not in self.nodes:
                self.nodes[name] = node
        shadowed.clear()

    @staticmethod
    def departure(edge: Child, shadowed: dict[str, Node]) -> Departure:
        """What dropping ``edge`` would close: every node below it that nothing else holds."""
        drops: dict[Node, int] = {}
        closing: set[Node] = set()
        edges = {edge}
        pending = [edge.node]
        while pending:
            node = pending.pop()
            drops[node] = drops.get(node, 0) + 1
            if node.refcnt - drops[node] == 0 and node not in closing:
                closing.add(node)
                for child in node.children.values():
                    edges.add(child)
                    pending.append(child.node)
        return Departure(frozenset(edges), frozenset(closing), shadowed)

    @staticmethod
    def subtree(node: Node) -> list[Node]:
        """``node`` and every node below it, parents first."""
        return _below([node])

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
        self._host_keys[fd] = key
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

    def hold_host_file(self, fd: int, held_by: str) -> None:
        """Keep anyone from opening the file of ``fd`` until it is closed: host calls that
        were let go (``held_by`` names them) still use it."""
        self.host_files[self._host_keys[fd]].held_by = held_by

    @contextlib.contextmanager
    def opening_backing_of(self, node: Node) -> Iterator[None]:
        """While the body opens ``node``'s backing chain, none of the host files ``node``
        stands on may be opened again: that would be a loop."""
        keys = {
            key
            for key, host in self.host_files.items()
            if any(n in host.nodes for n in _below([node]))
        }
        token = _chain.set(_chain.get() | keys)
        try:
            yield
        finally:
            _chain.reset(token)

    def replace_host_file(self, old: int, new: int) -> None:
        """``new`` is a descriptor of the same file as ``old``, in its place (a reopen)."""
        self._host_keys[new] = self._host_keys.pop(old)

    def close_host_file(self, node: Node, fd: int) -> None:
        key = self._host_keys.pop(fd)
        host = self.host_files.get(key)
        if host is not None and node in host.nodes:
            host.nodes.remove(node)
            if not host.nodes:
                del self.host_files[key]
        os.close(fd)

    async def set_backing(
        self, node: Node, backing: Node | None, recorded: tuple[str, str] | None
    ) -> None:
        """Make ``backing`` (or nothing) ``node``'s backing file, in the graph and in its
        image header (``recorded``: the name and format to write there); the old backing
        node is released. For commit and stream, whose copies made the two equal. The new
        edge's permissions are checked before the header changes; if either fails, the old
        backing file stays, in both."""
        old = node.children.get("backing")
        async with node.drained():
            self._backing_edge(node, backing)
            if backing is not None:
                backing.refcnt += 1
            try:
                self.refresh_perms([node])
                await node.driver.change_backing_file(*(recorded or (None, None)))
            except BaseException:
                self._backing_edge(node, old.node if old is not None else None)
                if backing is not None:
                    backing.refcnt -= 1
                self.refresh_perms([node])
                raise
            finally:
                node.driver.children_changed()
        if old is not None:
            await self.unref(old.node)

    async def insert_filter(self, node: Node, name: str, options: Mapping[str, Any]) -> Node:
        """Put a filter opened from ``options`` between ``node`` and its child ``name``, in
        the graph only (an image header still names the child), as QEMU's commit puts
        commit_top over the top image; :meth:`remove_filter` takes it out again. If the
        permissions refuse it, nothing changed."""
        below = node.children[name].node
        added = await self.open_node({**options, "file": below.name})
        try:
            await self._repoint(node, name, added)
        except BaseException:
            await self.unref(added)
            raise
        await self.unref(below)  # the filter holds it now
        return added

    async def remove_filter(self, node: Node, name: str) -> None:
        """Undo :meth:`insert_filter`: ``node``'s child ``name`` is the filtered node again."""
        added = node.children[name].node
        below = added.driver.filtered.node
        below.refcnt += 1
        try:
            await self._repoint(node, name, below)
        except BaseException:
            below.refcnt -= 1
            raise
        await self.unref(added)

    async def _repoint(self, node: Node, name: str, child: Node) -> None:
        """Point ``node``'s child edge ``name`` at ``child`` (its role kept), permissions
        checked, all or nothing; references are the caller's to settle."""
        old = node.children[name]
        async with node.drained():
            self._point(node, name, child, old.role)
            try:
                self.refresh_perms([node])
            except BaseException:
                self._point(node, name, old.node, old.role)
                self.refresh_perms([node])
                raise
            finally:
                node.driver.children_changed()

    @staticmethod
    def _point(node: Node, name: str, child: Node, role: Role) -> None:
        edge = node.children.pop(name)
        edge.node.detach(edge)
        node.children[name] = child.attach(node, node.name, name, role)

    @staticmethod
    def _backing_edge(node: Node, backing: Node | None) -> None:
        """Point ``node``'s backing edge at ``backing`` (or remove it); permissions and
        references are the caller's to settle."""
        edge = node.children.pop("backing", None)
        if edge is not None:
            edge.node.detach(edge)
        if backing is not None:
            node.children["backing"] = backing.attach(node, node.name, "backing", Role.COW)

    async def refresh_sizes(self, top: Node) -> None:
        """Ask every node below ``top`` for its size again, children first (a host file that
        was resized behind our back)."""
        for node in reversed(_below([top])):
            await node.refresh_size()

    def _generate_name(self) -> str:
        return f"#node{next(self._counter)}"

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


@dataclass
class _PermPlan:
    """Permissions computed and checked by :meth:`Graph._plan_perms`, not yet applied."""

    edges: dict[Child, tuple[Perm, Perm]] = field(default_factory=dict)
    nodes: dict[Node, tuple[Perm, Perm]] = field(default_factory=dict)


def _refusal(
    what: str, needer: str, missing: Perm, refusers: list[str], backing: bool, plain: str
) -> str:
    """Why ``needer`` cannot have ``missing`` on ``what``: where the users that refuse it
    (``refusers``) read it as a backing file, that writing it would change their disks;
    else ``plain``, naming them."""
    listed = ", ".join(refusers[:NAMED_USERS]) + (
        f" and {len(refusers) - NAMED_USERS} more" if len(refusers) > NAMED_USERS else ""
    )
    if backing and refusers and missing & (Perm.WRITE | Perm.RESIZE):
        return (
            f"{what} is the backing file of {listed} too: {needer} cannot "
            f"{'write' if Perm.WRITE in missing else 'resize'} it without changing "
            f"{'their disks' if len(refusers) > 1 else 'that disk'}"
        )
    return plain + (f" (used by {listed})" if refusers else "")


def _refusers(plan: _PermPlan, edges: Iterable[Child], missing: Perm) -> tuple[list[str], bool]:
    """The backends and jobs behind ``edges`` that refuse ``missing``: up from them, every
    edge that reads consistently or does not share it; and whether an overlay's backing
    edge is on the way."""
    return _users_behind(
        plan, edges, lambda perm, shared: bool(perm & Perm.CONSISTENT_READ or missing & ~shared)
    )


def _needers(plan: _PermPlan, edges: Iterable[Child], missing: Perm) -> list[str]:
    """The backends and jobs behind ``edges`` that need ``missing``."""
    return _users_behind(plan, edges, lambda perm, shared: bool(perm & missing))[0]


def _users_behind(
    plan: _PermPlan, edges: Iterable[Child], follows: Callable[[Perm, Perm], bool]
) -> tuple[list[str], bool]:
    """The users without a parent node (backends, jobs) up from ``edges`` through the edges
    whose permissions (as planned, else as held) ``follows`` accepts; and whether one of
    those is an overlay's backing edge."""
    found: dict[str, None] = {}
    backing = False
    pending = collections.deque(edges)
    seen: set[Child] = set()
    while pending:
        edge = pending.popleft()
        if edge in seen or not follows(*plan.edges.get(edge, (edge.perm, edge.shared))):
            continue
        seen.add(edge)
        backing = backing or Role.COW in edge.role
        if edge.parent is None:
            found[edge.label] = None
        else:
            pending.extend(edge.parent.parents)
    return list(found), backing


def _live(edges: Iterable[Child], departing: Departure) -> list[Child]:
    return [edge for edge in edges if edge not in departing.edges]


def _below(start: Iterable[Node]) -> list[Node]:
    """``start`` and every node below it, each after all its parents among them."""
    found: dict[Node, None] = {}
    stack = list(start)
    while stack:
        node = stack.pop()
        if node not in found:
            found[node] = None
            stack.extend(edge.node for edge in node.children.values())
    waiting = {node: sum(1 for edge in node.parents if edge.parent in found) for node in found}
    ready = [node for node, count in waiting.items() if count == 0]
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for edge in node.children.values():
            waiting[edge.node] -= 1
            if waiting[edge.node] == 0:
                ready.append(edge.node)
    if len(order) != len(found):
        raise BlockError(errno.ELOOP, "the node graph has a cycle")
    return order


def _above(node: Node) -> list[Node]:
    """``node`` and every node above it, children first."""
    found = [node]
    for below in found:
        found.extend(
            edge.parent
            for edge in below.parents
            if edge.parent is not None and edge.parent not in found
        )
    return found


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
