"""Stream (QEMU's block-stream): the data the backing chain above ``base`` holds is copied
into the active image, then it takes ``base`` (or nothing) as its backing file, and the
streamed images leave the chain.

The job puts a ``stream-top`` filter in front of the medium and copies, range by range, what
the images above the base hold and the active image does not: data as data, zeros as zero
clusters (so a zeroed range does not show the base's data once the chain is shortened). Each
copy and each guest write to the same range hold one range lock, and a range is looked up in
the active image under it, so a copy never writes old data over a newer write. Cancelled or
failed, the filter goes; what was copied stays (it is what the chain shows anyway).

A base outside the chain (any node, such as another backend's image opened read-only) is a
safe rebase, as ``qemu-img rebase`` does it: every range the active image leaves to its
backing chain is compared with the new base, and where the two differ what the backend
shows is copied into the active image, so the guest reads the same once the new base is its
backing file.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from blkfs.block import Child, Node, RangeLocks, Status
from blkfs.block.request import is_zero
from blkfs.errors import BlockError
from blkfs.jobs.chain import backing_name, chain, find_layer
from blkfs.jobs.copy import CHUNK, allocated_ranges, copy_range
from blkfs.jobs.filter import JobFilter
from blkfs.jobs.job import Job
from blkfs.jobs.ranges import RangeSet

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.jobs.manager import JobManager

PIECE = 64 << 10
"""What a rebase compares at once: a piece that differs from the new base is copied whole."""


class StreamJob(Job):
    type = "stream"
    writes_below = False
    """It writes the active image only (see :mod:`blkfs.jobs.filter`)."""

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        backend: BlockBackend,
        top: Node,
        base: Node | None,
        speed: int = 0,
        rebase: bool = False,
    ) -> None:
        super().__init__(manager, job_id, backend.name, speed)
        self.backend_obj = backend
        self.top = top
        self.base = base
        self.rebase = rebase
        """``base`` is not in the chain: copy what differs from it."""
        self.root = backend.root_node()
        self.locks = RangeLocks()
        self.filtered = False
        self.holds_base = False

    @property
    def registry(self) -> dict[str, Job]:
        return self.manager.layer.registry("jobs")

    async def prepare(self) -> None:
        if self.rebase:  # the new base stays open until it is the backing file
            assert self.base is not None
            self.base.refcnt += 1
            self.holds_base = True
        self.registry[self.id] = self
        await self.backend_obj.change(
            {"driver": "stream-top", "job": self.id, "file": self.root.name},
            same_data=True,
            by=self,
        )
        self.filtered = True

    async def intercept(
        self, offset: int, length: int, call: Callable[[], Awaitable[None]]
    ) -> None:
        """A guest write: never at once with a copy of the same range."""
        async with self.locks.hold(offset, length):
            await call()

    async def work(self) -> None:
        into = self.backend_obj.root_node().children["file"]  # the filter's edge: unfiltered
        todo = RangeSet()
        if self.rebase:  # the new base may differ anywhere, also where the chain holds nothing
            self.total += todo.add(0, self.top.size)
        else:
            below = self.top.children["backing"].node
            self.total += await allocated_ranges(
                below, self.base, min(self.top.size, below.size), todo
            )

        async def copy(start: int, end: int, buffers: tuple[bytearray, bytearray]) -> None:
            span = end - start
            async with self.locks.hold(start, span):
                while start < end:
                    extent = await self.top.block_status(start, end - start)
                    stop = start + extent.length
                    if Status.ALLOCATED in extent.status:
                        pass  # the active image's own: it stays what the guest reads
                    elif self.rebase:
                        await self.copy_differing(into, start, stop, *buffers)
                    else:
                        await copy_range(self.root, into, start, stop, buffers[0])
                    start = stop
            await self.step(span)

        def scratch() -> tuple[bytearray, bytearray]:
            """Ours, and for a rebase the new base's."""
            return bytearray(CHUNK), bytearray(CHUNK if self.rebase else 0)

        await self.copy_spans(lambda: todo.pop_first(CHUNK), copy, scratch)

    async def copy_differing(
        self, into: Child, start: int, end: int, buf: bytearray, theirs: bytearray
    ) -> None:
        """Copy into the active image the pieces of [start, end) where what the backend
        shows differs from the new base (past the base's end: zeros)."""
        assert self.base is not None
        length = end - start
        await self.root.readinto(start, memoryview(buf)[:length])
        inside = max(0, min(end, self.base.size) - start)
        if inside:
            await self.base.readinto(start, memoryview(theirs)[:inside])
        theirs[inside:length] = bytes(length - inside)
        for piece in range(0, length, PIECE):
            stop = min(length, piece + PIECE)
            if buf[piece:stop] == theirs[piece:stop]:
                continue
            ours = memoryview(buf)[piece:stop]
            if is_zero(ours):
                await into.write_zeroes(start + piece, stop - piece, unmap=True)
            else:
                await into.write(start + piece, ours)

    async def finish(self) -> None:
        await self.remove_filter()
        await self.manager.layer.set_backing(
            self.top, self.base, backing_name(self.top, self.base) if self.base else None
        )
        await self.release_base()

    async def abort(self) -> None:
        await self.remove_filter()
        await self.release_base()

    async def release_base(self) -> None:
        if self.holds_base:
            assert self.base is not None
            self.holds_base = False
            await self.manager.layer.release_node(self.base)

    async def remove_filter(self) -> None:
        if self.filtered:
            await self.backend_obj.change(f"node={self.root.name}", same_data=True, by=self)
            self.filtered = False
        self.registry.pop(self.id, None)


def stream(
    manager: JobManager, backend: BlockBackend, job_id: str | None, base: str | None, speed: int
) -> StreamJob:
    """The stream job asked for: into the active image, from the images above ``base``
    (default: the whole chain, which then leaves the image standalone); or, ``base`` a node
    outside the chain, what differs from it (a safe rebase)."""
    layers = chain(backend)
    if len(layers) == 1:  # (a rebase too: this image's zeros would not hide a new base's data)
        raise BlockError(
            errno.EINVAL, f"stream: {backend.name}'s image '{layers[0].name}' has no backing file"
        )
    layer = manager.layer
    if base and layer.has_node(base) and base not in (node.name for node in layers):
        new_base = layer.find_node(base)
        if new_base in layer.subtree(backend.root_node()) or layers[0] in layer.subtree(new_base):
            raise BlockError(
                errno.EINVAL,
                f"stream: node '{base}' is part of {backend.name}'s tree: it cannot be its base",
            )
        if new_base.filename() is None:
            raise BlockError(
                errno.EINVAL,
                f"stream: node '{base}' has no image file for '{layers[0].filename()}' to name",
            )
        if not new_base.read_only:
            raise BlockError(
                errno.EINVAL,
                f"stream: node '{base}' is writable: a new base "
                "must be opened read-only=on, so that it cannot "
                "change under the comparison",
            )
        return StreamJob(
            manager,
            manager.new_id(job_id, backend.name),
            backend,
            layers[0],
            new_base,
            speed,
            rebase=True,
        )
    base_node = find_layer(backend, layers, base, "base") if base else None
    if base_node is layers[0]:
        raise BlockError(errno.EINVAL, "stream: the base must lie below the active image")
    return StreamJob(
        manager, manager.new_id(job_id, backend.name), backend, layers[0], base_node, speed
    )


class StreamTopDriver(JobFilter):
    """In front of a stream's medium: a write never runs at once with the job's copy of
    the same range (see :meth:`StreamJob.intercept`)."""

    name = "stream-top"
