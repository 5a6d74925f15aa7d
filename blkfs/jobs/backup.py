"""Backup (QEMU's blockdev-backup): a point-in-time copy of a live backend.

The job puts a ``copy-before-write`` filter in front of the source: a write to a range the
job has not copied yet first copies the range's old data to the target, then goes on. In the
background the job copies every range still to do (``sync=full``: all of it; ``top``: what
the top image holds; ``incremental`` and ``bitmap``: what a dirty bitmap marks). So the
target ends up with the data as it was when the job started, whatever the guest wrote
meanwhile; then the filter goes. Cancelled or failed, the filter goes and the source is as
it was; the target is incomplete.

With a bitmap (QEMU's rules): at the start its marks are taken over by the job and the
bitmap starts afresh (recording what is written from then on, busy until the job ends).
``bitmap-mode`` says what it holds at the end: ``on-success`` (the only mode of
``sync=incremental``) gives the taken marks back unless the job succeeded, ``always``
gives back only what the job did not copy, ``never`` gives them all back.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import trio

from blkfs.block.dirty import DirtyBitmap, check_usable, find_below
from blkfs.errors import BlockError
from blkfs.jobs.copy import CHUNK, copy_range
from blkfs.jobs.filter import JobFilter
from blkfs.jobs.mirror import MirrorJob
from blkfs.jobs.ranges import RangeSet

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.jobs.manager import JobManager

BitmapMode = Literal["on-success", "always", "never"]


class BackupJob(MirrorJob):
    type = "backup"
    needs_completion = False
    filter_driver = "copy-before-write"
    point_in_time = True

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        backend: BlockBackend,
        target: dict[str, Any] | str,
        *args: Any,
        bitmap: str | None = None,
        bitmap_mode: BitmapMode | None = None,
    ) -> None:
        super().__init__(manager, job_id, backend, target, *args)
        if self.sync in ("incremental", "bitmap") and bitmap is None:
            raise BlockError(errno.EINVAL, f"backup: sync={self.sync} needs bitmap=NAME")
        if bitmap is None and bitmap_mode is not None:
            raise BlockError(errno.EINVAL, "backup: bitmap-mode needs bitmap=NAME")
        if self.sync == "incremental" and bitmap_mode not in (None, "on-success"):
            raise BlockError(errno.EINVAL, "backup: sync=incremental takes bitmap-mode=on-success")
        if self.sync == "bitmap" and bitmap_mode is None:
            raise BlockError(errno.EINVAL, "backup: sync=bitmap needs a bitmap-mode")
        self.bitmap_mode: BitmapMode = bitmap_mode or "on-success"
        self.bitmap: DirtyBitmap | None = None
        self.taken: DirtyBitmap | None = None
        """The bitmap's marks as the job took them."""
        if bitmap is not None:
            node, self.bitmap = find_below(backend.root_node(), bitmap)
            check_usable(self.bitmap, node.name, node.read_only, changing=True)
        self.target_settled = trio.Event()
        """Set once the target is taken, or the job failed before: a write that comes
        between the filter going in and the target being open waits for it."""
        self.claimed = RangeSet()
        """Spans a copy worker took out of ``dirty`` and has not copied yet (it waits for
        their range lock): a guest write copies what it finds of them first, as it does with
        ``dirty``, so it never lands in a span whose copy has not read the old data."""

    async def work(self) -> None:
        await self.copy_dirty()  # planned when the filter went in; done when copied

    async def copy_dirty(self) -> None:
        """Copy every span still to do, several at once; a worker claims its span, then
        copies what is still claimed of it under the range lock (a guest write may have
        copied part of it first, see :meth:`intercept`)."""
        source, edge = self.source, self.edge
        assert source is not None and edge is not None

        def claim() -> tuple[int, int] | None:
            span = self.dirty.pop_first(CHUNK)
            if span is not None:
                self.claimed.add(*span)
            return span

        async def copy(start: int, end: int, buf: bytearray) -> None:
            copied = 0
            async with self.locks.hold(start, end - start):
                for lo, hi in self.claimed.take(start, end):
                    await copy_range(source, edge, lo, hi, buf)
                    copied += hi - lo
            await self.step(copied)

        await self.copy_spans(claim, copy, lambda: bytearray(CHUNK))

    async def plan(self) -> None:
        """The bitmap's marks taken over (in one step: no write between), then what to
        copy by ``sync``."""
        bitmap = self.bitmap
        if bitmap is not None:
            self.taken = DirtyBitmap(bitmap.name, bitmap.size, bitmap.granularity, bits=bitmap.bits)
            bitmap.clear()
            bitmap.busy = True
        if self.sync in ("incremental", "bitmap"):
            assert self.taken is not None
            for start, length in self.taken.dirty_extents(0, self.taken.size):
                self.total += self.dirty.add(start, start + length)
        else:
            await super().plan()

    def _settle_bitmap(self, succeeded: bool) -> None:
        """Give the bitmap back what ``bitmap-mode`` says it keeps; it is free again."""
        bitmap, taken = self.bitmap, self.taken
        if bitmap is None or taken is None:
            return
        self.taken = None
        bitmap.busy = False
        if self.bitmap_mode == "never" or (self.bitmap_mode == "on-success" and not succeeded):
            bitmap.merge(taken)
        elif self.bitmap_mode == "always" and not succeeded:
            for start, end in self.dirty:  # what the job did not copy
                bitmap.mark(start, end - start)

    async def intercept(
        self, offset: int, length: int, call: Callable[[], Awaitable[None]]
    ) -> None:
        """Copy what the write is about to change, if not copied yet; then the write. The
        range lock is held from before the look at what is still to copy until the write is
        done: between the two, another write to the range would find nothing to copy and
        could land before the old data was read."""
        if self.edge is None:
            await self.target_settled.wait()
            if self.edge is None:  # the job failed before it took its target
                await call()
                return
        assert self.source is not None
        end = offset + length
        async with self.locks.hold(offset, length):
            for start, stop in [*self.dirty.take(offset, end), *self.claimed.take(offset, end)]:
                while start < stop:
                    step = min(stop, start + CHUNK)
                    await copy_range(self.source, self.edge, start, step, bytearray(step - start))
                    self.done += step - start
                    start = step
            await call()

    async def finish(self) -> None:
        """Done: the target holds the point in time; the filter goes."""
        assert self.target is not None and self.source is not None
        await self.target.flush()
        await self.backend_obj.change(f"node={self.source.name}", same_data=True, by=self)
        self.filtered = False
        self.layer.registry("jobs").pop(self.id, None)
        await self.close_target()
        self._settle_bitmap(succeeded=True)

    def attach_target(self) -> None:
        super().attach_target()
        self.target_settled.set()

    async def abort(self) -> None:
        self.target_settled.set()  # before the filter goes: its drain waits for the writes
        await super().abort()
        self._settle_bitmap(succeeded=False)


class CopyBeforeWriteDriver(JobFilter):
    """In front of a backup's source: a write first has the old data of its range copied
    to the target (see :meth:`BackupJob.intercept`)."""

    name = "copy-before-write"
