"""What a driver may use of the layer: :class:`NodeContext`.

A driver gets its node as a NodeContext: the facts of its own node (name, option values,
size, children) and the few services of the layer a driver needs (open a host file under
the image policy, open a child, probe a format, a registry shared by the nodes of one
graph). It never reaches the graph, its parents or its grandchildren; ``mypy --strict``
holds drivers to this interface, which :class:`~blkfs.block.node.Node` implements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from blkfs.block.dirty import DirtyBitmaps
    from blkfs.block.node import Child
    from blkfs.block.perm import Role


class NodeContext(Protocol):
    name: str
    values: dict[str, Any]
    """Typed option values, by dotted name."""
    size: int
    probed: bool
    """The format was chosen by probing the image's first bytes."""
    children: dict[str, Child]
    bitmaps: DirtyBitmaps
    """The node's dirty bitmaps: a format that stores them loads and stores them here."""

    @property
    def read_only(self) -> bool: ...

    def filename(self) -> str | None:
        """The host file this node's data lives in, looking through filters: what a
        relative backing file name is relative to."""

    async def open_child(
        self, name: str, options: dict[str, Any] | str, role: Role, *, read_only: bool = False
    ) -> Child:
        """Open (or reference, for a node name) a child and attach it as ``name``."""

    async def open_host_file(self, path: str, writable: bool) -> int:
        """A descriptor for a host image file, through the image policy, opened off the
        event loop; the layer knows which node has which file open."""

    def hold_host_file(self, held_by: str) -> None:
        """Nobody may open this node's host file until it is closed: host calls that were
        let go (``held_by`` names them) still use it."""

    def reopen_host_file(self, path: str, writable: bool) -> int:
        """Another descriptor for the host file this node has open (another access mode)."""

    def close_host_file(self, fd: int) -> None: ...

    def check_nbd_server(self, path: str | None, host: str | None, port: int) -> None:
        """BlockError (EACCES) unless the host policy lets a node reach this NBD server
        (a unix socket ``path``, or ``host``:``port``)."""

    def check_rbd_image(self, image: str) -> None:
        """BlockError (EACCES) unless the host policy lets a node reach a Ceph cluster."""

    def probe_format(self, header: bytes) -> str:
        """The format an image starting with ``header`` would be probed as."""

    def registry(self, kind: str) -> dict[str, Any]:
        """A registry shared by the nodes of one graph (throttle groups by name)."""
