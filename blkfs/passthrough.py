"""Kernel passthrough of a backend's file: which trees qualify, and what an open holds still.

A frontend that can have the kernel serve a backend's reads and writes straight from a host
file (FUSE passthrough) asks here first. Such I/O never reaches blkfs: no request path sees
it (no drain, no statistics, no error policy, no dirty bitmap, no job's copy-before-write), so
it is allowed only for a tree in which nothing needs to: ``raw`` (named, not probed: the
probed image's first-sector guard sees writes) over ``file``, the whole file, no other user of
either node, no dirty bitmap, and errors reported as they come (``werror=report``,
``rerror=report``). And while one such open lives, the tree must not change under it: each
backend with passthrough opens is held (QEMU's op blockers, :meth:`BlockLayer.block`), so
every change of it (media change, eject, insert, resize, rollback, snapshot, job, filter,
reopen, new dirty bitmap) is refused with EBUSY naming the holder until they close. The
kernel cannot take a passthrough open back, so there is no ESTALE way out as with
``on-change=error``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import trio

from blkfs.block.node import Node
from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.layer import BlockLayer

HOLDER = object()
"""The holder (:meth:`BlockLayer.block`) of a backend with passthrough opens."""
HOW = "passthrough=on needs raw (driver=raw, no offset or size) over a file"


def refusal(backend: BlockBackend) -> str | None:
    """Why the kernel may not serve ``backend``'s I/O from its host file now (None: it
    may). The tree is read through the graph, never through a driver's internals."""
    if backend.werror != "report" or backend.rerror != "report":
        return (
            "passthrough I/O errors reach the caller as the host gives them: "
            "it needs werror=report and rerror=report"
        )
    root = backend._root
    if root is None:
        return "no medium"
    raw = root.node
    file_edge = raw.children.get("file")
    if raw.driver.name != "raw" or file_edge is None or len(raw.children) != 1:
        return f"{HOW}; the medium is {_describe(raw)}"
    if raw.probed:
        return f"{HOW}: this raw image was probed (name driver=raw: see Options in README)"
    host = file_edge.node
    if host.driver.name != "file" or host.children:
        return f"{HOW}; the medium is {_describe(raw)}"
    located = raw.driver.locate(0, raw.size)
    if located is None or located.child is not file_edge or located.offset or located.passed:
        return f"{HOW}: this raw node shows part of its file (offset or size)"
    if raw.size != host.size:
        return f"{HOW}: this raw node shows part of its file (offset or size)"
    for node, edge in ((raw, root), (host, file_edge)):
        others = [e.label for e in node.parents if e is not edge]
        if others:
            return f"node '{node.name}' has another user ({others[0]}), which must see the I/O"
        if node.bitmaps.by_name:
            return f"node '{node.name}' has dirty bitmaps, which must see every write"
    return None


def _describe(node: Node) -> str:
    """``qcow2 (file: file, backing: qcow2 (file: file))``."""
    children = ", ".join(f"{role}: {_describe(e.node)}" for role, e in node.children.items())
    return node.driver.name + (f" ({children})" if children else "")


def host_node(backend: BlockBackend) -> Node:
    """The file node under a qualifying backend's raw node."""
    return backend._medium().children["file"].node


async def open_host_file(layer: BlockLayer, node: Node) -> int:
    """A new read-only descriptor of ``node``'s host file, through the image allowlist and
    checked to be the very file the node has open (the path may name another by now); the
    caller closes it. The kernel reopens the file by its path for each passthrough open."""
    key = layer.graph.host_keys.get(node)
    if key is None:
        raise BlockError(errno.EIO, f"node '{node.name}' has no host file")
    path = layer.graph.host_files[key].path
    fd = await trio.to_thread.run_sync(node.reopen_host_file, path, False)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != key:
        os.close(fd)
        raise BlockError(errno.ESTALE, f"'{path}' is no longer the file node '{node.name}' has")
    return fd


def holder_reason(count: int) -> str:
    return (
        f"open with kernel passthrough ({count} file{'s' if count > 1 else ''}: the kernel "
        "reads and writes the host file without blkfs)"
    )
