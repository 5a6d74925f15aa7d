"""The block backend API: everything a frontend may touch (QEMU's BlockBackend).

A :class:`BlockBackend` is a named, reference-counted root that stays put while media come
and go beneath it. Frontends (FUSE, ``.ctl``, the CLI) use only this module, the registry
of backends (:mod:`blkfs.layer`) and :mod:`blkfs.errors`; they never see a node. The backend
checks every request once (medium present, range, read-only state), counts it for drain and
statistics, and hands it to the root node (the request path: :mod:`blkfs.backend_io`).

Graph changes (insert, eject, change, delete) drain the backend first: new requests wait, the
ones in flight finish, the tree is replaced (one call into the graph:
:meth:`~blkfs.block.graph.Graph.replace_root`), then the waiting requests run against the new
medium. A change that fails leaves the old medium untouched.

A backend counts its references: its name (while it is not deleted) and every open user (a
frontend's open file). Users that write are counted apart: while one is open, ejecting,
changing to other media, rolling back or deleting is refused (EBUSY) unless forced, as QEMU
refuses to eject a locked tray, because a filesystem mounted on the disk would lose what it
has not written yet.

Every change of a backend (its medium, its size, its content in time, its name) asks
:meth:`BlockBackend.check_op` here, whoever sends it: the command layer, a frontend's
truncate, a job. A running job holds the backend still (QEMU's op blockers, a table the
layer keeps: :meth:`blkfs.layer.BlockLayer.block`) until it ends.
Frontends keep no rules of their own.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from blkfs import passthrough
from blkfs.backend_io import BackendIO, IoError, Limits
from blkfs.block.driver import Extent, Status
from blkfs.block.node import Child, Node
from blkfs.block.options import format_options, parse_bool, parse_options, parse_size
from blkfs.block.perm import Perm
from blkfs.block.workers import shared_pool
from blkfs.error_policy import Policy
from blkfs.errors import BlockError, OptionError
from blkfs.info import BackendStatus, NodeTree

if TYPE_CHECKING:
    from blkfs.layer import BlockLayer

__all__ = [
    "BlockBackend",
    "BlockError",
    "Extent",
    "IoError",
    "Limits",
    "OptionError",
    "Status",
    "parse_bool",
    "parse_options",
    "parse_size",
    "start_workers",
]

log = logging.getLogger("blkfs.backend")

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,127}$")
Listener = Callable[["BlockBackend", str], None]
"""Called with the backend and the event: 'medium', 'size' or 'delete'."""
Options = str | Mapping[str, Any]
Medium = str | Mapping[str, Any]
"""A validated medium: an option tree, or the name of an existing node."""
ON_CHANGE_CHOICES = ("follow", "error")
LIMITS_DRIVER = "throttle"
"""The driver of the filters that hold a backend's I/O limits (see :func:`_limits`)."""
LET_GO_SECONDS = 1.0
"""How long eject, change and delete with force=on wait for the outgoing medium's requests
and its flush before they let a device that does not answer go (``BlockBackend.letting_go``)."""


def start_workers() -> None:
    """Make the process's worker threads for host I/O now: a daemon calls it once it has
    forked, so that their eventfd is one of its descriptors from the start."""
    shared_pool()


class BlockBackend(BackendIO):
    """A named root: the unit frontends open, read, write and change media on."""

    def __init__(
        self,
        layer: BlockLayer,
        name: str,
        read_only: bool = False,
        on_change: str = "follow",
        werror: Policy = "enospc",
        rerror: Policy = "report",
        passthrough: bool = False,
    ) -> None:
        super().__init__(werror, rerror)
        self.layer = layer
        self.name = name
        self.on_change = on_change
        """What users that opened the backend before a media change see after it: the new
        medium ("follow", as a drive), or ESTALE until they open it again ("error")."""
        self.generation = 0
        """Counts media changes (insert, eject, change), so a user can tell which medium
        it opened."""
        self.refcnt = 1
        """References: the name while the backend is not deleted, and each open user."""
        self.named = True
        self.writers = 0
        """Open users that write (a loop device, a writable descriptor)."""
        self._root: Child | None = None
        self._read_only = read_only
        self._graph_lock = trio.Lock()
        self._listeners: list[Listener] = []
        self.passthrough = passthrough
        """Whether a frontend may have the kernel serve opens from the host file (see
        :mod:`blkfs.passthrough`)."""
        self.passthrough_opens = 0
        """Opens the kernel serves now: while there are any, the backend is held still."""

    def __repr__(self) -> str:
        return f"<BlockBackend {self.name}>"

    # -- state -------------------------------------------------------------------------

    @property
    def has_medium(self) -> bool:
        return self._root is not None

    def length(self) -> int:
        """The medium's size in bytes, 0 with no medium."""
        return self._root.node.size if self._root else 0

    @property
    def resizable(self) -> bool:
        return self._root is not None and Perm.RESIZE in self._root.perm

    @property
    def open_count(self) -> int:
        """Users that have the backend open (its name is not one)."""
        return self.refcnt - self.named

    def add_listener(self, listener: Listener) -> None:
        """Register a callback for medium, size and delete events (cache invalidation)."""
        self._listeners.append(listener)

    def stale(self, generation: int) -> bool:
        """Whether a user that opened the backend at ``generation`` must open it again."""
        return self.on_change == "error" and generation != self.generation

    def _media_changed(self) -> None:
        self.generation += 1
        self._notify("medium")

    def _notify(self, event: str) -> None:
        self.changed_ns = time.time_ns()
        for listener in list(self._listeners):
            listener(self, event)

    # -- who may change the backend (QEMU's op blockers) ------------------------------------

    def check_op(
        self, what: str, *, by: object = None, writers: bool = False, force: bool = False
    ) -> None:
        """EBUSY unless ``what`` may change the backend now: no holder but ``by`` keeps it
        still (the layer's table, :meth:`~blkfs.layer.BlockLayer.block`), the error policy
        has not paused it and, for a change of what its users see (``writers``: eject, other
        media, rollback, delete), nobody has it open for writing.
        ``force`` passes writers and a pause (whose held requests then fail with EIO); a
        holder is never forced past: a job ends or is cancelled first."""
        for holder, (reason, until) in self.layer.holders(self).items():
            if holder is not by:
                raise BlockError(errno.EBUSY, f"{self.name}: {reason}; {what} {until}")
        if self._pause is not None and by is None and not (writers and force):
            raise BlockError(
                errno.EBUSY,
                f"{self.name}: {self._pause.describe()}; {what} "
                f"once resumed (make room, then 'cont {self.name}')"
                + (", or add force=on: the held requests then fail with EIO" if writers else ""),
            )
        if writers and not force:
            self._check_writers(what)
        if self._pause is not None and by is None:  # force=on: the held requests fail
            self._end_pause(abandon=True)

    def _check_writers(self, what: str) -> None:
        if self.writers:
            users = f"{self.writers} writer{'s' if self.writers > 1 else ''}"
            raise BlockError(
                errno.EBUSY,
                f"{self.name}: open for writing ({users}; a loop "
                "device does not show in lsof: losetup -j shows "
                f"it); refusing to {what}: a filesystem on it would "
                "lose what it has not written yet. Unmount and "
                "close it first, or add force=on",
            )

    # -- kernel passthrough (blkfs.passthrough) ---------------------------------------------

    def passthrough_refusal(self) -> str | None:
        """Why a new open may not be served by the kernel from the host file (None: it
        may). While such opens live the tree is held still, so it still qualifies."""
        if not self.passthrough:
            return "passthrough=off"
        return None if self.passthrough_opens else passthrough.refusal(self)

    async def hold_passthrough(self) -> int:
        """One more open served by the kernel: the backend is held still until the last
        is released (:meth:`release_passthrough`). Returns a new read-only descriptor of
        the host file, which the caller closes; BlockError if the tree does not qualify."""
        reason = self.passthrough_refusal()
        if reason is not None:
            raise BlockError(errno.EINVAL, f"{self.name}: no passthrough: {reason}")
        node = passthrough.host_node(self)
        self._count_passthrough(+1)
        try:
            return await passthrough.open_host_file(self.layer, node)
        except BaseException:
            self._count_passthrough(-1)
            raise

    def release_passthrough(self) -> None:
        self._count_passthrough(-1)

    def _count_passthrough(self, step: int) -> None:
        self.passthrough_opens += step
        if self.passthrough_opens:
            reason = passthrough.holder_reason(self.passthrough_opens)
            self.layer.block(self, passthrough.HOLDER, reason, "once they are closed")
        else:
            self.layer.unblock(self, passthrough.HOLDER)

    def set_policies(
        self, werror: Policy | None, rerror: Policy | None, on_change: str | None
    ) -> None:
        """Change the error policies and on-change live; a policy passthrough opens cannot
        follow is refused while they live."""
        if self.passthrough_opens and {werror or "report", rerror or "report"} != {"report"}:
            self.check_op("set werror or rerror to other than report")
        self.werror = werror or self.werror
        self.rerror = rerror or self.rerror
        self.on_change = on_change or self.on_change

    # -- references ----------------------------------------------------------------------

    def ref(self, writer: bool = False) -> None:
        """A new user; a ``writer`` keeps the medium from being ejected or changed."""
        self.refcnt += 1
        self.writers += writer

    async def unref(self, writer: bool = False) -> None:
        """Drop a reference; the last one drains, flushes and closes the medium."""
        self.refcnt -= 1
        self.writers -= writer
        if self.refcnt == 0:
            self.layer._forget(self)
            async with self._graph_lock, self._requests.tracker.drained():
                root, self._root = self._root, None
                if root is not None:
                    try:
                        await root.node.flush()
                    finally:
                        await self._replace_root(root, None)
            log.info("%s: closed", self.name)

    def root_node(self) -> Node:
        """The top of the medium under the backend's I/O limits (see :func:`_limits`): what
        block jobs and snapshots work on, never a frontend, which knows no nodes."""
        node = self._medium()
        while node.driver.name == LIMITS_DRIVER:
            node = node.driver.filtered.node
        return node

    async def rewind(self, call: Callable[[], Awaitable[None]], force: bool = False) -> None:
        """Run ``call``, which changes what the medium holds beneath its users (a rollback),
        with the backend drained and its graph still; refused under writers unless
        ``force``."""
        async with self._graph_lock:
            self.check_op("roll it back", writers=True, force=force)
            async with self._requests.tracker.drained():
                self._medium()
                await call()
        self._notify("medium")

    async def truncate(self, length: int, shrink: bool = False) -> None:
        """Resize the medium if its tree can; the size listeners hear of it. A disk shrinks
        only when asked to with ``shrink``, as ``qemu-img resize --shrink``: a truncate to a
        smaller size is what ``dd`` without ``conv=notrunc`` does to its output, and it
        would throw away the end of the disk."""
        async with self._graph_lock:
            self.check_op("resize it")  # before the drain, which a paused request would hold
            async with self._requests.tracker.drained():
                await self._truncate(length, shrink)
        log.info("%s: resized to %d bytes", self.name, length)
        self._notify("size")

    async def _truncate(self, length: int, shrink: bool) -> None:
        node = self._medium()
        if self.read_only:
            raise BlockError(errno.EROFS, f"{self.name}: read-only medium")
        if length < node.size and not shrink:
            raise BlockError(
                errno.EPERM,
                f"{self.name}: refusing to shrink the disk from "
                f"{node.size} to {length} bytes; write in place "
                "(dd conv=notrunc) or shrink explicitly with "
                f"'{self.name} {length} shrink=on' > .ctl/resize",
            )
        await node.truncate(length)

    async def refresh_size(self) -> None:
        """Take the size the medium has now (an image resized on the host), as
        ``losetup -c`` does."""
        async with self._graph_lock:
            self.check_op("resize it")
            old = self.length()
            async with self._requests.tracker.drained():
                await self.layer.graph.refresh_sizes(self._medium())
        if self.length() != old:
            log.info("%s: size is now %d bytes", self.name, self.length())
            self._notify("size")

    async def allocated_bytes(self) -> int | None:
        """Host bytes the medium's image takes, if its tree knows."""
        if self._root is None:
            return 0
        return await self._root.node.driver.allocated_bytes()

    # -- media ---------------------------------------------------------------------------

    async def insert(self, options: Options) -> None:
        """Insert a medium into an empty backend."""
        tree = self.layer.parse(options)
        async with self._graph_lock:
            self.check_op("insert a medium")
            if self._root is not None:
                raise BlockError(
                    errno.EBUSY,
                    f"{self.name}: already has a medium (use change to replace it, or eject first)",
                )
            async with self._requests.tracker.drained():
                self._root = await self._replace_root(None, tree)
        log.info("%s: inserted %s", self.name, _spelled(tree))
        self._media_changed()

    async def eject(self, force: bool = False) -> None:
        """Remove the medium: drain, flush, close; the backend stays, with size 0. Refused
        while a user writes, and if the flush fails (the medium stays and serves), unless
        ``force``."""
        async with self._graph_lock:
            if self._root is None:
                raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium to eject")
            self.check_op("eject it", writers=True, force=force)
            async with self.letting_go(force), self._requests.tracker.drained():
                await self._flush_outgoing(force)
                root, self._root = self._root, None
                try:
                    await self._replace_root(root, None)
                except BlockError as exc:  # a flush of nodes let go: the tree is gone
                    if not force:
                        raise
                    log.warning(
                        "%s: the old medium closed with an error (force=on): %s",
                        self.name,
                        exc.message,
                    )
        log.info("%s: ejected%s", self.name, " (forced)" if force else "")
        self._media_changed()

    async def change(
        self,
        options: Options,
        force: bool = False,
        *,
        same_data: bool = False,
        before_swap: Callable[[], Awaitable[None]] | None = None,
        by: object = None,
    ) -> None:
        """Replace the medium atomically; on an empty backend this is insert.

        The outgoing tree is drained and flushed before anything opens the new one, which
        may take over the outgoing tree's nodes (a filter put in front of the same image, an
        overlay on top of it) instead of opening their images again. While a user writes,
        only such a change is allowed unless ``force``: one whose new tree keeps the old
        medium's image (see :func:`_same_medium`). If building the new tree fails,
        the old medium stays as it was.

        A block job's switch passes ``same_data`` (the new medium holds the same data: not a
        media change, whoever writes), ``by`` (itself: the one holder the change may pass)
        and may run ``before_swap`` while the backend is drained (a mirror's last copy).
        Such a switch keeps the backend's I/O limits over the new tree (:func:`_limits`):
        ``options`` describe what goes under them, from :meth:`root_node` down.
        """
        tree = self.layer.parse(options)
        async with self._graph_lock:
            self.check_op("change its medium", by=by)
            async with self.letting_go(force), self._requests.tracker.drained():
                await self._change(tree, force, same_data, before_swap)
        log.info("%s: changed medium to %s", self.name, _spelled(tree))
        if same_data:
            self._notify("medium")
        else:
            self._media_changed()

    async def _change(
        self,
        tree: Medium,
        force: bool,
        same_data: bool,
        before_swap: Callable[[], Awaitable[None]] | None,
    ) -> None:
        old = self._root
        if before_swap is not None:
            await before_swap()
        if old is not None:
            await self._flush_outgoing(force)
            if same_data:
                tree = _kept_over(_limits(old.node), tree)

        def allow(old: Node, new: Node) -> None:
            if not (force or same_data) and not _same_medium(old, new):
                self._check_writers("change to other media")

        self._root = await self._replace_root(old, tree, allow)

    async def _replace_root(
        self,
        old: Child | None,
        tree: Medium | None,
        allow: Callable[[Node, Node], None] | None = None,
    ) -> Child | None:
        return await self.layer.graph.replace_root(
            old, tree, user=f"backend '{self.name}'", read_only=self._read_only, allow=allow
        )

    async def _flush_outgoing(self, force: bool, going: str = "replacing the medium") -> None:
        """Flush the medium before it goes; a failure stops the command unless ``force``
        (whatever the error policy: a command fails, it does not wait for ``cont``)."""
        if self._root is None:
            raise BlockError(errno.ENOMEDIUM, f"{self.name}: no medium")
        try:
            await self._root.node.flush()
        except BlockError as exc:
            if not force:
                raise
            log.warning("%s: flush failed, %s anyway (force=on): %s", self.name, going, exc.message)

    @asynccontextmanager
    async def letting_go(self, force: bool) -> AsyncIterator[None]:
        """With ``force``, the body (a drain and flush of the outgoing medium, then its
        replacement) does not wait more than :data:`LET_GO_SECONDS` on a device that does
        not answer: the host calls of this backend's own nodes still in flight then are let
        go (their requests fail with EIO at once, and so does every later call to those
        nodes, their closing flush included; a node with nothing in flight is left alone),
        and the nodes' host files close when the calls return (see
        :meth:`BlockDriver.let_go`). A node another backend also uses is not this backend's
        to give up."""
        if not force:
            yield
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._let_go_after, LET_GO_SECONDS)
            yield
            nursery.cancel_scope.cancel()

    async def _let_go_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        error = BlockError(errno.EIO, f"given up with force=on: no answer in {seconds:g}s")
        stuck = [(node.name, node.driver.let_go(error)) for node in self._own_nodes()]
        answered = [f"{count} on node {name}" for name, count in stuck if count]
        if answered:
            log.warning(
                "%s: the device did not answer in %gs; given up with EIO (force=on): %s request(s)",
                self.name,
                seconds,
                ", ".join(answered),
            )

    def _own_nodes(self) -> list[Node]:
        """The nodes of this backend's tree that no one else uses, parents first."""
        if self._root is None or len(self._root.node.parents) > 1:
            return []
        own = [self._root.node]
        for node in self.layer.subtree(own[0])[1:]:
            if all(edge.parent in own for edge in node.parents):
                own.append(node)
        return own

    # -- status --------------------------------------------------------------------------

    async def status(self) -> BackendStatus:
        """Everything status files show of this backend, as plain data."""
        return {
            "name": self.name,
            "deleted": not self.named,
            "medium": self.has_medium,
            "read-only": self.read_only,
            "size": self.length(),
            "allocated": await self.allocated_bytes(),
            "open": self.open_count,
            "writers": self.writers,
            "generation": self.generation,
            "on-change": self.on_change,
            "werror": self.werror,
            "rerror": self.rerror,
            "passthrough": {
                "on": self.passthrough,
                "open": self.passthrough_opens,
                "why-not": self.passthrough_refusal() if self.passthrough else None,
            },
            "io-status": self._pause.io_status if self._pause else "ok",
            "paused": self._pause.as_dict() if self._pause else None,
            "stats": self.stats.as_dict(),
            "tree": describe_tree(self._root.node) if self._root else None,
        }


def _spelled(medium: Medium) -> str:
    return f"node {medium}" if isinstance(medium, str) else format_options(medium)


def _limits(root: Node) -> list[Node]:
    """The throttle filters at the top of a medium, top first: the backend's I/O limits
    (``throttle``, QEMU's block_set_io_throttle). QEMU keeps them in its BlockBackend, so a
    snapshot's overlay goes under them and a job's switch keeps them; blkfs's switches
    (:meth:`BlockBackend.change` with ``same_data``) put them back over the new tree."""
    found = []
    while root.driver.name == LIMITS_DRIVER:
        found.append(root)
        root = root.driver.filtered.node
    return found


def _kept_over(limits: list[Node], tree: Medium) -> Medium:
    """``tree`` under new filters with the options of ``limits`` as they are now (a name
    the user gave, the limits, the throttle group); a filter's own bucket starts afresh,
    a group's is shared and stays."""
    for node in reversed(limits):
        options = node.given_options()
        if "node-name" not in node.options:  # generated: the new filter gets its own
            options.pop("node-name", None)
        tree = {**options, "driver": node.driver.name, "file": tree}
    return tree


def _same_medium(old: Node, new: Node) -> bool:
    """Whether the new tree keeps serving the old one's medium: the image under the old
    filters lies in the new tree (a filter put in, taken out or replaced; an overlay put
    on top). A move down the old tree (to a backing file, which would drop the overlay's
    writes, or to an image's file node, which would hand its metadata to the guest) is not."""
    return _in_tree(_under_filters(old), new)


def _under_filters(node: Node) -> Node:
    while node.driver.is_filter:
        node = node.driver.filtered.node
    return node


def _in_tree(node: Node, root: Node) -> bool:
    return node is root or any(_in_tree(node, edge.node) for edge in root.children.values())


def describe_tree(node: Node) -> NodeTree:
    """A node and its subtree as plain data (status, status.json)."""
    return {
        "node-name": node.name,
        "driver": node.driver.name,
        "read-only": node.read_only,
        "size": node.size,
        "options": node.given_options(),
        "info": node.driver.info(),
        "stats": node.stats.as_dict(),
        "dirty-bitmaps": node.bitmaps.info(),
        "in-flight": node.in_flight,
        "oldest-ms": node.oldest_host_call_ms(),
        "children": {role: describe_tree(edge.node) for role, edge in node.children.items()},
    }
