"""The graph's nodes by name, and their permissions.

Permissions (:mod:`blkfs.block.perm`) are recomputed by :meth:`PermissionGraph.refresh_perms`
whenever an edge comes or goes, all or nothing, as QEMU's bdrv_refresh_perms does: a conflict
between two users of a node, a writer of a read-only node, or two nodes whose uses of one host
file conflict fail the change that caused it. While a tree is being replaced
(:meth:`~blkfs.block.graph.Graph.replace_root`), the edges of the outgoing tree are a
:class:`Departure`: they do not count.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from blkfs.block.node import Child, Node
from blkfs.block.perm import ALL, WRITERS, Perm, Role, Use, conflict, conflicting, cumulative
from blkfs.block.policy import HostPolicy
from blkfs.block.registry import DriverRegistry, default_registry
from blkfs.errors import BlockError, NotFound

log = logging.getLogger("blkfs.graph")

NAMED_USERS = 5
"""Most users a refusal names (a base may have a thousand overlays)."""


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


@contextlib.contextmanager
def departing(edge: Child, shadowed: dict[str, Node]) -> Iterator[Departure]:
    """While the body runs, ``edge`` and what would close without it do not count in
    permissions, and ``open_node`` may take over its nodes or their names; the names it
    takes are noted in ``shadowed``."""
    departure = departure_of(edge, shadowed)
    token = _departing.set(departure)
    try:
        yield departure
    finally:
        _departing.reset(token)


def current_departure() -> Departure:
    """The departing part of the graph while a medium changes; nothing otherwise."""
    return _departing.get() or Departure()


@dataclass
class HostFile:
    """One host file and the nodes that have it open."""

    path: str
    nodes: list[Node] = field(default_factory=list)
    held_by: str | None = None
    """Set while host calls let go with force=on still use the file (see
    ``BuildingGraph.hold_host_file``): nobody may open it meanwhile."""


class PermissionGraph:
    """All nodes of one blkfs instance, by name, and their permissions."""

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
        self.host_keys: dict[Node, tuple[int, int]] = {}
        """The (device, inode) of the file each node opened: closing it must not ask the
        host (a hung device would hang the fstat)."""
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

    @staticmethod
    def subtree(node: Node) -> list[Node]:
        """``node`` and every node below it, parents first."""
        return nodes_below([node])

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
        departing = current_departure()
        flags = read_only or {}
        plan = _PermPlan()
        for node in nodes_below(start):
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


def departure_of(edge: Child, shadowed: dict[str, Node]) -> Departure:
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


def _live(edges: Iterable[Child], departing: Departure) -> list[Child]:
    return [edge for edge in edges if edge not in departing.edges]


def nodes_below(start: Iterable[Node]) -> list[Node]:
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
