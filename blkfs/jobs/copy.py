"""Copying a range from one node to another, as every job does it: zeros stay sparse."""

from __future__ import annotations

from blkfs.block import Child, Node, Status
from blkfs.block.host_copy import copy_between_hosts
from blkfs.block.request import is_zero
from blkfs.jobs.chain import format_node
from blkfs.jobs.ranges import RangeSet

CHUNK = 1 << 20
"""Bytes one step of a job copies: large enough to be cheap per byte, small enough that a
write waiting for a copy in flight waits little."""
STATUS_WINDOW = 8 << 20
"""Most one allocation query asks about: a format maps what it is asked, and a query that
reaches to the end of the disk but is answered for a first short extent only made planning
a job quadratic in the disk's size. After a short answer the next query asks twice as
much, not more (an image of alternating 1 MiB extents was mapped eight times over)."""


async def copy_range(source: Node, target: Child, start: int, end: int, buf: bytearray) -> None:
    """Copy [start, end), at most ``len(buf)`` bytes, from ``source`` to ``target``, extent
    by extent: what reads as zeros is written as zeros (no data), so a fresh target stays
    sparse where the source is; data from host file to host file where both ends map to
    one (copy_file_range), else through ``buf``."""
    while start < end:
        extent = await source.block_status(start, end - start)
        length = min(extent.length, end - start)
        view = memoryview(buf)[:length]
        if Status.DATA in extent.status:
            if await copy_between_hosts(source, target, start, length):
                start += length
                continue
            await source.readinto(start, view)
        if Status.DATA not in extent.status or is_zero(view):
            await target.write_zeroes(start, length, unmap=True)
        else:
            await target.write(start, view)
        start += length


async def allocated_ranges(top: Node, base: Node | None, size: int, into: RangeSet) -> int:
    """Add to ``into`` what the images from ``top`` down to, not including, ``base`` hold
    in [0, size); returns how many bytes were new."""
    added = position = 0
    window = STATUS_WINDOW
    while position < size:
        length, held = await allocated_above(top, base, position, min(size, position + window))
        if held:
            added += into.add(position, position + length)
        position += length
        window = min(STATUS_WINDOW, 2 * length)
    return added


async def allocated_above(top: Node, base: Node | None, start: int, end: int) -> tuple[int, bool]:
    """(a prefix length of [start, end), whether an image from ``top`` down to, not
    including, ``base`` holds it): what a commit or a stream must copy (QEMU's
    bdrv_is_allocated_above). Filters are looked through."""
    node: Node | None = format_node(top)
    length = end - start
    while node is not None and node is not base:
        extent = await node.block_status(start, length)
        if Status.ALLOCATED in extent.status:
            return extent.length, True
        length = extent.length
        backing = node.children.get("backing")
        node = (
            format_node(backing.node) if backing is not None and start < backing.node.size else None
        )
    return length, False
