"""``raw``: the format that is no format, optionally exposing a slice of its child.

With ``offset`` and ``size`` it shows one partition of a disk image, as QEMU's raw driver
and nbdkit's offset filter do.

An image whose format was probed, not named, could be turned into another format by what a
guest writes into it: a qcow2 header naming ``/etc/shadow`` as its backing file would be
followed the next time the image is probed. As QEMU does (raw_co_pwritev), a probed raw node
works in whole sectors and refuses (EPERM) a write of a first sector that would probe as
another format; ``driver=raw`` is the way to give a guest a disk it may write anything to.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import Any, BinaryIO

from blkfs.block import (
    BlockDriver,
    BlockError,
    Child,
    ChildSpec,
    Extent,
    Option,
    Perm,
    Role,
    WriteFlags,
)
from blkfs.block.driver import Located
from blkfs.block.perm import child_perm

PROBE_SECTOR = 512


class RawDriver(BlockDriver):
    name = "raw"
    is_format = True
    supported_write_flags = WriteFlags.FUA | WriteFlags.NO_FALLBACK  # the file's to honour
    options = {
        "offset": Option("size", 0, "where the exposed range starts in the child"),
        "size": Option("size", None, "length of the exposed range (default: to the end)"),
    }
    children = {"file": ChildSpec(help="the image holding the data")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.offset: int = values["offset"]
        self.size: int | None = values["size"]
        end = self.child("file").node.size
        if self.offset > end or (self.size is not None and self.offset + self.size > end):
            raise BlockError(
                errno.EINVAL,
                f"raw: offset {self.offset} + size {self.size} "
                f"is beyond the end of the file ({end} bytes)",
            )
        if self.node.probed:
            self.request_alignment = PROBE_SECTOR
        self.discard_granularity = self.child("file").node.discard_granularity

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 1

    @classmethod
    def create(
        cls,
        file: BinaryIO,
        size: int,
        options: Mapping[str, str],
        backing: str | None,
        backing_format: str | None,
    ) -> None:
        """A sparse file of ``size`` bytes, as ``qemu-img create -f raw``."""
        if options:
            raise BlockError(
                errno.EINVAL,
                f"raw: unknown option(s) {', '.join(sorted(options))} (raw images take none)",
            )
        if backing:
            raise BlockError(
                errno.EINVAL,
                "raw: raw images cannot have a backing file (use -f qcow2 for an overlay)",
            )
        file.truncate(size)

    def child_perm(
        self, child: Child, writable: bool, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm]:
        """A slice (offset/size) is its file's data, not all of it; either way raw needs write
        and resize of the file only when its parents do (reference: raw_child_perm)."""
        values = self.node.values  # asked before open, when the child is attached
        sliced = values["offset"] or values["size"] is not None
        role = Role.DATA | Role.PRIMARY if sliced else child.role
        nperm, nshared = child_perm(role, writable, perm, shared)
        grow = Perm.WRITE | Perm.RESIZE
        return (nperm & ~grow) | (perm & grow), nshared

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.child("file").readinto(self.offset + offset, buf)

    def locate(self, offset: int, length: int, *, write: bool = False) -> Located | None:
        """Always known, and never changes: the same range of the file, shifted; a write
        too, except one of a probed image's first sector, which :meth:`write` checks."""
        if write and self.node.probed and offset < PROBE_SECTOR:
            return None
        return Located(self.child("file"), self.offset + offset)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        if self.node.probed and offset == 0:  # aligned: the whole first sector
            fmt = self.node.probe_format(bytes(data[:PROBE_SECTOR]))
            if fmt != self.name:
                raise BlockError(
                    errno.EPERM,
                    f"raw: refusing a write that would make the "
                    f"probed raw image look like {fmt} (a guest "
                    "could make it open host files); name the "
                    "format (driver=raw) for a disk that may hold "
                    "any data",
                )
        await self.child("file").write(self.offset + offset, data, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.child("file").discard(self.offset + offset, length)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self.child("file").write_zeroes(self.offset + offset, length, unmap, flags)

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
