"""The graph: trees of nodes by name, and the changes of live trees.

:class:`Graph` builds on :class:`~blkfs.block.graph_build.BuildingGraph` (opening and
closing trees) and :class:`~blkfs.block.graph_perms.PermissionGraph` (names and
permissions). Here are the changes of a live graph, each one call that undoes itself when it
fails: a backend's tree replaced (:meth:`Graph.replace_root`: insert, eject, media change, a
job's switch, a snapshot), a node reopened with new options, a backing file changed, a
filter put in and taken out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from blkfs.block.graph_build import BuildingGraph
from blkfs.block.graph_perms import departing, nodes_below
from blkfs.block.node import Child, Node
from blkfs.block.options import list_options, validate
from blkfs.block.perm import FILTERED, WRITERS, Role, root_perms
from blkfs.errors import BlockError, OptionError

log = logging.getLogger("blkfs.graph")


class Graph(BuildingGraph):
    """All nodes of one blkfs instance, by name, and the changes of live trees."""

    # -- replacing a root ----------------------------------------------------------------

    async def replace_root(
        self,
        edge: Child | None,
        tree: Mapping[str, Any] | str | None,
        *,
        user: str,
        read_only: bool = False,
        allow: Callable[[Node, Node], None] | None = None,
    ) -> Child | None:
        """Make the tree that ``tree`` describes (or the node it names) the one ``user``, a
        user with no parent node (a backend), holds through its root edge, in place of
        ``edge``'s, as one transaction (QEMU's blk_insert_bs and bdrv_replace_node); return
        the new edge, or None when ``tree`` is None (the old tree is only let go).

        ``edge`` None is an insert. In a replacement, the outgoing tree does not count in
        permissions while the new one opens, and the new one may take over its nodes (a
        filter put in front of the same image, an overlay on top of it) and their names;
        ``allow(old_root, new_root)`` may refuse the change once the new tree is open. If
        anything fails, the old tree holds its names, permissions and image locks again and
        nothing new stays open. Nodes the new tree took over that nobody writes any more
        turn read-only, as QEMU's blockdev-snapshot leaves the old top, so that their
        images are locked for reading only."""
        if tree is None:
            if edge is not None:
                await self._release_root(edge)
            return None
        if edge is None:
            return await self._open_root(tree, user, read_only)
        kept = nodes_below([edge.node])
        new = await self._swap_root(edge, tree, user, read_only, allow)
        try:
            await self._release_root(edge)
        except BlockError as exc:  # the new tree serves: the old one is gone either way
            log.warning("%s: the old medium closed with an error: %s", user, exc.message)
        await self._settle(kept, user)
        return new

    async def _open_root(self, tree: Mapping[str, Any] | str, user: str, read_only: bool) -> Child:
        node = await self.open_node(tree, read_only=read_only)
        perm, shared = root_perms(read_only or node.read_only)
        edge = node.attach(None, user, "root", FILTERED, perm, shared)
        try:
            self.refresh_perms([node])
        except BaseException:
            await self._release_root(edge)
            raise
        return edge

    async def _swap_root(
        self,
        old: Child,
        tree: Mapping[str, Any] | str,
        user: str,
        read_only: bool,
        allow: Callable[[Node, Node], None] | None,
    ) -> Child:
        """The new root edge for ``tree``, checked as the final graph will be; on failure
        the old tree holds its permissions (and image locks) again."""
        shadowed: dict[str, Node] = {}
        try:
            with departing(old, shadowed):
                self.refresh_perms([old.node])  # give up what only the old tree needed
                new = await self._open_root(tree, user, read_only)
            try:
                if allow is not None:
                    allow(old.node, new.node)
                with departing(old, shadowed):
                    self.refresh_perms([new.node, old.node])
            except BaseException:
                await self._release_root(new)
                raise
        except BaseException:
            self._unshadow(shadowed)
            try:
                self.refresh_perms([old.node])
            except BlockError as exc:
                log.error(
                    "%s: the medium could not take its image locks back: %s", user, exc.message
                )
            raise
        return new

    async def _release_root(self, edge: Child) -> None:
        edge.node.detach(edge)
        await self.unref(edge.node)

    async def _settle(self, nodes: list[Node], user: str) -> None:
        """Nodes a new tree took over from the old one that nobody writes any more become
        read-only."""
        for node in nodes:
            if node.refcnt and not node.read_only and not node.perm & WRITERS:
                try:
                    await self.reopen(node.name, {"read-only": True})
                except BlockError as exc:
                    log.warning("%s: node %s stays writable: %s", user, node.name, exc.message)

    def _unshadow(self, shadowed: dict[str, Node]) -> None:
        """A change failed: departing nodes get back the names new nodes had taken."""
        for name, node in shadowed.items():
            if node.refcnt and name not in self.nodes:
                self.nodes[name] = node
        shadowed.clear()

    # -- reopening -----------------------------------------------------------------------

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

    # -- backing files and filters -------------------------------------------------------

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
