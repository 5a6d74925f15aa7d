"""A backend's backing chain as jobs see it: its format nodes from the top down, filters
looked through; and how an image header names its backing file."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from blkfs.block import Node, Role
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend


def format_node(node: Node) -> Node:
    """The first node at or below ``node`` that is not a filter."""
    while node.driver.is_filter:
        node = node.driver.filtered.node
    return node


def chain(backend: BlockBackend) -> list[Node]:
    """The backend's images, the active one first, its last backing file last."""
    layers = [format_node(backend.root_node())]
    while (backing := layers[-1].children.get("backing")) is not None:
        layers.append(format_node(backing.node))
    return layers


def find_layer(backend: BlockBackend, layers: list[Node], name: str, what: str) -> Node:
    """The image of the chain named ``name`` (a node name or its image's file name)."""
    for node in layers:
        if name in (node.name, node.filename()):
            return node
    shown = ", ".join(f"{n.name} ({n.filename()})" for n in layers)
    raise BlockError(
        errno.EINVAL, f"{what} '{name}' is not in {backend.name}'s backing chain: {shown}"
    )


def overlay_of(node: Node) -> Node:
    """The image whose backing file ``node`` is."""
    above = [
        edge.parent for edge in node.parents if edge.parent is not None and Role.COW in edge.role
    ]
    if len(above) != 1:
        raise BlockError(
            errno.EINVAL,
            f"node '{node.name}' is the backing file of {len(above)} images; exactly one is needed",
        )
    return above[0]


def backing_name(overlay: Node, base: Node) -> tuple[str, str]:
    """(name, format) an image header records for ``base`` as ``overlay``'s backing file."""
    return header_name(overlay.filename(), base.filename() or base.name), base.driver.name


def header_name(overlay: str | None, base: str) -> str:
    """How the header of the image file ``overlay`` names the image file ``base``: relative
    to the overlay's directory where both lie in one (as QEMU writes it), else absolute."""
    base = os.path.abspath(base)
    if overlay and os.path.dirname(os.path.abspath(overlay)) == os.path.dirname(base):
        return os.path.basename(base)
    return base
