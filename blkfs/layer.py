"""The block layer: the registry of backends of one blkfs instance, over one graph of nodes.

Frontends find, create and delete backends here (:class:`BlockLayer`), add nodes on their
own (QMP's blockdev-add), reopen live nodes and hear of I/O errors; what they do with a
backend is :mod:`blkfs.backend`'s.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import trio

from blkfs.backend import (
    NAME_RE,
    ON_CHANGE_CHOICES,
    BlockBackend,
    Medium,
    Options,
    describe_tree,
)
from blkfs.backend_io import IoErrorListener
from blkfs.block.graph import Graph
from blkfs.block.node import Child, Node
from blkfs.block.options import format_options, parse_bool, parse_options
from blkfs.block.perm import ALL, FILTERED, Perm, root_perms
from blkfs.block.policy import HostPolicy
from blkfs.error_policy import POLICIES, Policy
from blkfs.errors import BlockError, NotFound, OptionError
from blkfs.info import BackendStatus, NodeTree
from blkfs.passthrough import refusal as passthrough_refusal

log = logging.getLogger("blkfs.backend")


class BlockLayer:
    """The registry of backends of one blkfs instance, over one graph of nodes."""

    def __init__(
        self, image_dirs: list[str] | None = None, nbd_servers: list[str] | None = None
    ) -> None:
        self.graph = Graph(policy=HostPolicy(image_dirs, nbd_servers or ()))
        self._backends: dict[str, BlockBackend] = {}
        self._deleted: set[BlockBackend] = set()
        """Deleted backends that users still hold open."""
        self._added: dict[str, Node] = {}
        """Nodes added on their own (QMP's blockdev-add), each holding one reference, so
        that backends and exports can be made on them by name (``node=NAME``)."""
        self.io_error_listeners: list[IoErrorListener] = []
        """Told of every request a backend's medium fails (see :class:`IoError`)."""
        self._holders: dict[BlockBackend, dict[object, tuple[str, str]]] = {}
        """Who holds which backend still (QEMU's op blockers): why, and until when."""

    @property
    def image_dirs(self) -> tuple[str, ...] | None:
        return self.graph.policy.image_dirs

    def block(self, backend: BlockBackend, holder: object, reason: str, until: str) -> None:
        """Keep ``backend``'s medium, size and content still for ``holder`` (a running job):
        every change of it but the holder's own is refused
        (:meth:`~blkfs.backend.BlockBackend.check_op`), saying ``reason``, and ``until`` when
        it may be tried again."""
        self._holders.setdefault(backend, {})[holder] = (reason, until)

    def unblock(self, backend: BlockBackend, holder: object) -> None:
        held = self._holders.get(backend, {})
        held.pop(holder, None)
        if not held:
            self._holders.pop(backend, None)

    def holders(self, backend: BlockBackend) -> Mapping[object, tuple[str, str]]:
        """Who holds ``backend`` still, with why and until when."""
        return self._holders.get(backend, {})

    def check_node_op(self, node: Node, what: str) -> None:
        """EBUSY if ``node`` lies in the tree of a backend with kernel passthrough opens: a
        change of one of its nodes (a reopen, a new dirty bitmap) changes what they bypass."""
        for backend in [*self._backends.values(), *self._deleted]:
            root = backend._root
            if backend.passthrough_opens and root and node in self.graph.subtree(root.node):
                backend.check_op(what)

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
        passthrough: bool = False,
    ) -> BlockBackend:
        """A new backend, with a medium from ``options`` or empty; nothing is left behind
        if the medium cannot be opened, nor if ``passthrough`` is asked for a medium that
        does not qualify (:func:`blkfs.passthrough.refusal`)."""
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
        backend = BlockBackend(self, name, read_only, on_change, werror, rerror, passthrough)
        self._backends[name] = backend  # reserve the name while the medium opens
        try:
            if options is not None:
                await backend.insert(options)
            refused = passthrough_refusal(backend) if passthrough and options is not None else None
            if refused is not None:
                raise OptionError(f"{name}: cannot serve it with passthrough=on: {refused}")
        except BaseException:
            del self._backends[name]
            if backend.has_medium:
                with trio.CancelScope(shield=True):
                    await backend.unref()
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
        async with backend.letting_go(force):
            await self._delete(backend, force)

    async def _delete(self, backend: BlockBackend, force: bool) -> None:
        name = backend.name
        if force:  # what is in flight ends (or is let go) before the name goes
            await backend._requests.tracker.idle()
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
        self.check_node_op(node, f"reopen node '{node_name}'")
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
                backend._root.perm, backend._root.shared = root_perms(backend._read_only)
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

    def added_nodes(self) -> list[NodeTree]:
        """The nodes added on their own, as status shows trees."""
        return [describe_tree(node) for node in self._added.values()]

    # -- the nodes beneath the backends, for block jobs and snapshots (never a frontend) ----

    def find_node(self, name: str) -> Node:
        return self.graph.find(name)

    def has_node(self, name: str) -> bool:
        return name in self.graph.nodes

    def subtree(self, node: Node) -> list[Node]:
        """``node`` and every node below it, parents first."""
        return self.graph.subtree(node)

    def registry(self, kind: str) -> dict[str, Any]:
        """What the nodes share, by kind: ``jobs`` (the job each job filter works for, by
        id), ``snapshot-overlays`` (overlays a snapshot is putting on)."""
        return self.graph.registry(kind)

    async def open_node(self, options: Medium) -> Node:
        """A tree opened from ``options`` (or the node named), with a reference for the
        caller, who gives it back with :meth:`release_node`."""
        return await self.graph.open_node(options)

    async def release_node(self, node: Node) -> None:
        await self.graph.unref(node)

    def attach_user(self, node: Node, user: str, name: str, perm: Perm, shared: Perm) -> Child:
        """An edge from ``user`` (a job), which has no parent node, to ``node``, with the
        permissions it needs and shares; refused (and nothing attached) if another user of
        the node does not allow them."""
        edge = node.attach(None, user, name, FILTERED, perm, shared)
        try:
            self.graph.refresh_perms([node])
        except BaseException:
            self.detach_user(edge)
            raise
        return edge

    def detach_user(self, edge: Child) -> None:
        """Undo :meth:`attach_user`: the node gives up what the edge needed."""
        edge.node.detach(edge)
        self.graph.refresh_perms([edge.node])

    async def reopen_node(self, name: str, options: Mapping[str, Any]) -> None:
        """Change the options of a node no backend has as its root (see :meth:`reopen`)."""
        self.check_node_op(self.graph.find(name), f"reopen node '{name}'")
        await self.graph.reopen(name, options)

    async def set_backing(
        self, node: Node, backing: Node | None, recorded: tuple[str, str] | None
    ) -> None:
        """Make ``backing`` ``node``'s backing file, in the graph and in its image header
        (see :meth:`blkfs.block.graph.Graph.set_backing`)."""
        await self.graph.set_backing(node, backing, recorded)

    async def insert_filter(self, node: Node, name: str, options: Mapping[str, Any]) -> Node:
        """Put a filter between ``node`` and its child ``name`` (see
        :meth:`blkfs.block.graph.Graph.insert_filter`)."""
        return await self.graph.insert_filter(node, name, options)

    async def remove_filter(self, node: Node, name: str) -> None:
        await self.graph.remove_filter(node, name)

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

    async def status(self) -> list[BackendStatus]:
        """Every backend, and those deleted that users still hold open."""
        return [await b.status() for b in [*self._backends.values(), *self._deleted]]
