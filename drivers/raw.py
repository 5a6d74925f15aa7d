"""``raw``: the format that is no format, optionally exposing a slice of its child.

With ``offset`` and ``size`` it shows one partition of a disk image, as QEMU's raw driver
and nbdkit's offset filter do.
"""

from __future__ import annotations

import errno
from typing import Any, BinaryIO, Mapping

from blkfs.block import BlockDriver, BlockError, ChildSpec, Extent, Option


class RawDriver(BlockDriver):
    name = "raw"
    is_format = True
    options = {
        "offset": Option("size", 0, "where the exposed range starts in the child"),
        "size": Option("size", None, "length of the exposed range (default: to the end)"),
    }
    children = {"file": ChildSpec(help="the image holding the data")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.offset = values["offset"]
        self.size = values["size"]
        end = self.child("file").node.size
        if self.offset > end or (self.size is not None and self.offset + self.size > end):
            raise BlockError(errno.EINVAL, f"raw: offset {self.offset} + size {self.size} "
                                           f"is beyond the end of the file ({end} bytes)")

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 1

    @classmethod
    def create(cls, file: BinaryIO, size: int, options: Mapping[str, str],
               backing: str | None, backing_format: str | None) -> None:
        """A sparse file of ``size`` bytes, as ``qemu-img create -f raw``."""
        if options:
            raise BlockError(errno.EINVAL, f"raw: unknown option(s) {', '.join(sorted(options))}"
                                           " (raw images take none)")
        if backing:
            raise BlockError(errno.EINVAL, "raw: raw images cannot have a backing file "
                                           "(use -f qcow2 for an overlay)")
        file.truncate(size)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.child("file").readinto(self.offset + offset, buf)

    async def write(self, offset: int, data: memoryview) -> None:
        await self.child("file").write(self.offset + offset, data)

    async def discard(self, offset: int, length: int) -> None:
        await self.child("file").discard(self.offset + offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self.child("file").write_zeroes(self.offset + offset, length, unmap)

    async def length(self) -> int:
        if self.size is not None:
            return self.size
        return self.child("file").node.size - self.offset

    async def truncate(self, length: int) -> None:
        if self.size is not None or self.offset:
            raise BlockError(errno.ENOTSUP, "raw: a slice (offset/size) cannot be resized")
        await self.child("file").truncate(length)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.child("file").block_status(self.offset + offset, length)
