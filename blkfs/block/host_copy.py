"""Copying a range from one node to another inside the host, where both ends lie in host
files (``copy_file_range``): the bytes never pass through the process, and a filesystem that
can share extents (XFS, btrfs) shares them.

Both ends are found with :meth:`BlockDriver.locate`, the source as a read and the target as a
write, down to the nodes whose drivers hold the data (``file``); those copy, through their
own request paths (checked, counted, tracked for drain). The nodes in between, whose request
paths the copy skips, admit it in their trackers, as a located read does, so a drain of any
of them waits for it; if one is drained, nothing is copied and the caller takes the plain way
(which waits at that node's door); so does a copy onto a node with dirty bitmaps, which only
its own request path marks. The caller keeps the source range from being written
meanwhile (a job's range lock), as for any read it makes.
"""

from __future__ import annotations

from blkfs.block.node import Child, Node
from blkfs.block.request import Tracker


def located_end(node: Node, offset: int, length: int, write: bool) -> tuple[Node, int, list[Node]]:
    """(the node where ``locate`` stops answering, the range's offset there, the nodes
    passed on the way, ``node`` first if it is not that node)."""
    passed: list[Node] = []
    while (located := node.driver.locate(offset, length, write=write)) is not None:
        if located.child is None:  # zeros: nothing to copy from (or write to)
            break
        passed += [node, *located.passed]
        node, offset = located.child.node, located.offset
    return node, offset, passed


async def copy_between_hosts(source: Node, target: Child, offset: int, length: int) -> bool:
    """Copy ``length`` bytes at ``offset`` of ``source`` to the same offset of ``target``
    inside the host, if both lie in host files there; False (nothing done) if not."""
    src, src_offset, src_passed = located_end(source, offset, length, write=False)
    dst, dst_offset, dst_passed = located_end(target.node, offset, length, write=True)
    if any(node.bitmaps.by_name for node in dst_passed):
        return False  # their dirty bitmaps must see the write: the plain way marks them
    trackers: list[Tracker] = []
    try:
        for node in {id(n): n for n in [*src_passed, *dst_passed]}.values():
            if not node.tracker.try_enter():
                return False
            trackers.append(node.tracker)
        return await dst.copy_from(dst_offset, src, src_offset, length)
    finally:
        for tracker in trackers:
            tracker.leave()
