"""A FUSE filesystem whose one file answers every read with at most 4 KiB, as network
filesystems may answer O_DIRECT reads in the middle of a file: ``python -m tests.short_reads
MOUNTPOINT IMAGE`` serves IMAGE as MOUNTPOINT/disk (read-only, direct_io, so the kernel hands
the short reads on to the reader) until it is unmounted."""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

PIECE = 4096
"""The most one read returns."""
DISK = pyfuse3.ROOT_INODE + 1


class ShortReads(pyfuse3.Operations):
    def __init__(self, image: str) -> None:
        super().__init__()
        self.fd = os.open(image, os.O_RDONLY)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
        elif inode == DISK:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = os.fstat(self.fd).st_size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 512
        return attr

    async def lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != b"disk":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(DISK)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != DISK or flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, min(size, PIECE), off)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"disk", await self.getattr(DISK), 1)


def main(mountpoint: str, image: str) -> None:
    pyfuse3.init(ShortReads(image), mountpoint, {"fsname=shortreads", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
