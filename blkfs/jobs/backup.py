"""Backup (QEMU's blockdev-backup): a point-in-time copy of a live backend.

The job puts a ``copy-before-write`` filter in front of the source: a write to a range the
job has not copied yet first copies the range's old data to the target, then goes on. In the
background the job copies every range still to do (``sync=full``: all of it; ``top``: what
the top image holds). So the target ends up with the data as it was when the job started,
whatever the guest wrote meanwhile; then the filter goes. Cancelled or failed, the filter
goes and the source is as it was; the target is incomplete.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from blkfs.jobs.copy import CHUNK, copy_range
from blkfs.jobs.filter import JobFilter
from blkfs.jobs.mirror import MirrorJob


class BackupJob(MirrorJob):
    type = "backup"
    needs_completion = False
    filter_driver = "copy-before-write"

    async def work(self) -> None:
        await self.plan()
        await self.copy_dirty()

    async def intercept(
        self, offset: int, length: int, call: Callable[[], Awaitable[None]]
    ) -> None:
        """Copy what the write is about to change, if not copied yet; then the write."""
        assert self.source is not None and self.edge is not None
        for start, end in self.dirty.take(offset, offset + length):
            async with self.locks.hold(start, end - start):
                while start < end:
                    step = min(end, start + CHUNK)
                    await copy_range(self.source, self.edge, start, step, bytearray(step - start))
                    self.done += step - start
                    start = step
        async with self.locks.hold(offset, length):
            await call()

    async def finish(self) -> None:
        """Done: the target holds the point in time; the filter goes."""
        assert self.target is not None and self.source is not None
        await self.target.flush()
        await self.backend_obj.change(f"node={self.source.name}", same_data=True, by=self)
        self.filtered = False
        self.layer.registry("jobs").pop(self.id, None)
        await self.close_target()


class CopyBeforeWriteDriver(JobFilter):
    """In front of a backup's source: a write first has the old data of its range copied
    to the target (see :meth:`BackupJob.intercept`)."""

    name = "copy-before-write"
