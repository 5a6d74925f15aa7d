"""Dirty bitmap operations on a layer's nodes (QEMU's block-dirty-bitmap-* commands).

The rules are QEMU's: a bitmap that a job or an export uses (busy) cannot be changed or
removed; an inconsistent one (found in use in its image at open: the image was not closed
cleanly) can only be removed; a persistent bitmap needs a writable node whose format stores
bitmaps (qcow2), and a persistent bitmap of a read-only node cannot change.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from blkfs.block import Node
from blkfs.block.dirty import DEFAULT_GRANULARITY, DirtyBitmap, check_usable
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer


def find(layer: BlockLayer, node: str, name: str) -> tuple[Node, DirtyBitmap]:
    found = layer.find_node(node)
    return found, found.bitmaps.find(name)


def usable(node: Node, bitmap: DirtyBitmap, changing: bool = True) -> DirtyBitmap:
    """``bitmap``, if it may be used (and, with ``changing``, changed)."""
    check_usable(bitmap, node.name, node.read_only, changing)
    return bitmap


async def add(
    layer: BlockLayer,
    node: str,
    name: str,
    granularity: int | None,
    persistent: bool,
    disabled: bool,
) -> None:
    found = layer.find_node(node)
    layer.check_node_op(found, f"add dirty bitmap '{name}'")
    granularity = granularity or DEFAULT_GRANULARITY
    bitmap = DirtyBitmap(name, found.size, granularity, persistent=persistent, enabled=not disabled)
    if persistent:
        if found.read_only:
            raise BlockError(errno.EROFS, f"node '{node}' is read-only: no persistent bitmap")
        found.driver.check_new_bitmap(name, granularity)
    found.bitmaps.add(bitmap)


async def remove(layer: BlockLayer, node: str, name: str) -> None:
    found, bitmap = find(layer, node, name)
    if bitmap.busy:
        raise BlockError(errno.EBUSY, f"bitmap '{name}' is in use by a job or export")
    if bitmap.persistent:
        if found.read_only:
            raise BlockError(errno.EROFS, f"bitmap '{name}' is persistent and '{node}' read-only")
        await found.driver.remove_stored_bitmap(name)
    found.bitmaps.remove(name)


def clear(layer: BlockLayer, node: str, name: str) -> None:
    usable(*find(layer, node, name)).clear()


def enable(layer: BlockLayer, node: str, name: str, enabled: bool) -> None:
    found, bitmap = find(layer, node, name)
    usable(found, bitmap).enabled = enabled
    found.bitmaps.changed()


def merge(layer: BlockLayer, node: str, target: str, sources: Iterable[str]) -> None:
    """Mark in ``target`` what every one of ``sources`` (bitmaps of the same node) has
    marked; all checked before any changes."""
    found, into = find(layer, node, target)
    usable(found, into)
    froms = [usable(found, found.bitmaps.find(source), changing=False) for source in sources]
    for source in froms:
        into.merge(source)
