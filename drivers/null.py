"""``null``: reads zeros, drops writes (QEMU's null-co); for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blkfs.block import BlockDriver, Extent, Option, Status, WriteFlags


class NullDriver(BlockDriver):
    name = "null"
    supported_write_flags = WriteFlags.FUA | WriteFlags.NO_FALLBACK  # nothing to make durable
    options = {"size": Option("size", 1 << 30, "the size it claims")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.size: int = values["size"]

    async def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(buf.nbytes)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        pass

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def length(self) -> int:
        return self.size

    async def truncate(self, length: int) -> None:
        self.size = length

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(length, Status.ZERO | Status.ALLOCATED)

    async def allocated_bytes(self) -> int | None:
        return 0
