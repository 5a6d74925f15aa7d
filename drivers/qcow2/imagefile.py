"""The image file as the metadata code sees it, and the header's reads and writes.

The metadata cache, the refcount allocator and the check do their I/O through
:class:`ImageFile`, so each can be tested over a file in memory; the driver hands them a
:class:`ChildFile` over its ``file`` child. The request paths (reads, in-place writes) use the
child directly.
"""

from __future__ import annotations

import errno
from typing import Protocol

from blkfs.block import BlockError, Child

from .ondisk import V2_HEADER_LENGTH, FormatError, Header


class ImageFile(Protocol):
    """What the metadata code needs of the image's file: its size, reads, writes, flushes
    (barriers) and discards (giving freed clusters' space back)."""

    @property
    def size(self) -> int: ...
    async def read(self, offset: int, length: int) -> bytes | bytearray: ...
    async def write(self, offset: int, data: bytes | bytearray) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...


class ChildFile:
    """An :class:`ImageFile` over a driver's child edge."""

    def __init__(self, child: Child) -> None:
        self.child = child

    @property
    def size(self) -> int:
        return self.child.node.size

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.child.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        await self.child.write(offset, data)

    async def flush(self) -> None:
        await self.child.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.child.discard(offset, length)


async def read_header(file: ImageFile) -> tuple[Header, bytes]:
    """The image's header and first cluster (as much of it as the file holds); EINVAL if it
    is not a qcow2 header blkfs can read."""
    try:
        head = bytes(await file.read(0, min(file.size, 4096)))
        header = Header.unpack(head)
        if header.cluster_size > len(head):
            head = bytes(await file.read(0, min(file.size, header.cluster_size)))
            header = Header.unpack(head)
    except FormatError as exc:
        raise BlockError(errno.EINVAL, f"qcow2: {exc}") from None
    return header, head


async def write_header(file: ImageFile, header: Header) -> None:
    """Make the header's version 2 fields durable: the ones an open image changes (size, the
    L1 and refcount tables' places). The rest of the header area stays as it is on disk; it
    may hold extensions blkfs does not write."""
    await file.write(0, header.pack()[:V2_HEADER_LENGTH])
    await file.flush()
