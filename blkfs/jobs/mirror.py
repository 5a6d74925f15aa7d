"""Mirror (QEMU's blockdev-mirror) and active commit, which is a mirror into the base.

The job puts a ``mirror-top`` filter in front of the source; every write that passes it
marks its range dirty (or, with ``mode=write-blocking``, is copied to the target before it
completes, so the job converges whatever the guest writes). The job copies what ``sync``
asks (``full``: everything; ``top``: what the top image holds; ``none``: only what is
written from now on), then whatever became dirty meanwhile, and goes ready. Until
job-complete it keeps the target in sync; then, with the backend drained, it copies what is
left and switches the backend to the target, in one step. A copy in flight and a guest
write to the same range never interleave (one range lock), so the target never gets stale
data over a newer write. Cancelled or failed, the filter goes and the source is as it was.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from blkfs.block import Child, Node, Perm, RangeLocks
from blkfs.block.perm import ALL
from blkfs.errors import BlockError
from blkfs.jobs.chain import chain
from blkfs.jobs.copy import CHUNK, allocated_ranges, copy_range
from blkfs.jobs.filter import JobFilter
from blkfs.jobs.job import Job
from blkfs.jobs.ranges import RangeSet
from blkfs.jobs.target import target_options

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.jobs.manager import JobManager
    from blkfs.layer import BlockLayer

Sync = Literal["full", "top", "none", "incremental", "bitmap"]
"""What a job copies first: the last two, a bitmap's dirty ranges, are for backups."""
Mode = Literal["background", "write-blocking"]
GRANULARITY = 64 * 1024
"""Writes dirty whole units of this size."""


class MirrorJob(Job):
    type = "mirror"
    needs_completion = True
    filter_driver = "mirror-top"
    point_in_time = False
    """The job copies the source as it was when its filter went in (a backup): it plans
    what to copy then, with the backend drained, since every write the filter sees from
    then on must find its range planned. A mirror plans later: a write only marks a range
    dirty again."""
    target_perm = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
    """A mirror writes new data into its target."""
    writes_below = False
    """Whether the target lies below the source (a commit): then the job's filter lets it
    write there (:mod:`blkfs.jobs.filter`)."""

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        backend: BlockBackend,
        target: dict[str, Any] | str,
        sync: Sync = "full",
        mode: Mode = "background",
        speed: int = 0,
    ) -> None:
        super().__init__(manager, job_id, backend.name, speed)
        self.backend_obj = backend
        self.target_spec = target
        self.sync = sync
        self.mode = mode
        self.dirty = RangeSet()
        self.locks = RangeLocks()
        self.source: Node | None = None
        self.target: Node | None = None
        """The target while the job holds a reference on it."""
        self.edge: Child | None = None
        """The job's edge to the target, through which it writes."""
        self.filtered = False
        self.draining = False

    @property
    def layer(self) -> BlockLayer:
        return self.manager.layer

    # -- the target -------------------------------------------------------------------------

    async def open_target(self) -> Node:
        """The node the job writes, with a reference for the job: a new node (a mirror)."""
        return await self.layer.open_node(self.target_spec)

    def attach_target(self) -> None:
        """The job's edge to the target: refused (EBUSY naming them) if the target's other
        users do not let the job write it, as an overlay over it does not; taken once the
        job's filter is in, which lets a commit's own chain have the base written."""
        assert self.target is not None
        if self.target.size < self.backend_obj.length():
            raise BlockError(
                errno.EINVAL,
                f"{self.type}: the target ({self.target.size} "
                f"bytes) is smaller than {self.backend} "
                f"({self.backend_obj.length()} bytes)",
            )
        self.edge = self.layer.attach_user(
            self.target, f"job '{self.id}'", "target", self.target_perm, ALL & ~Perm.WRITE
        )

    def detach_target(self) -> None:
        if self.edge is not None:
            edge, self.edge = self.edge, None
            self.layer.detach_user(edge)

    async def close_target(self) -> None:
        """Give up the target: the job's edge and its reference."""
        self.detach_target()
        target, self.target = self.target, None
        if target is not None:
            await self.layer.release_node(target)

    # -- the work ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Put the job's filter in front of the source, then open and take the target."""
        backend = self.backend_obj
        self.source = backend.root_node()
        self.layer.registry("jobs")[self.id] = self
        await backend.change(
            {
                "driver": self.filter_driver,
                "job": self.id,
                "file": self.source.name,
                "read-only": self.source.read_only,
            },
            same_data=True,
            by=self,
            before_swap=self.plan if self.point_in_time else None,
        )
        self.filtered = True
        self.target = await self.open_target()
        self.attach_target()

    async def work(self) -> None:
        if not self.point_in_time:
            await self.plan()
        await self.copy_dirty()
        await self.wait_until_completed(self.copy_dirty)

    async def plan(self) -> None:
        """What to copy first, by ``sync``."""
        assert self.source is not None
        size = self.source.size
        if self.sync == "full":
            self.total += self.dirty.add(0, size)
        elif self.sync == "top":
            await self.add_allocated(self.source, self.bottom())

    async def add_allocated(self, top: Node, base: Node | None) -> None:
        """Mark what the layers from ``top`` down to ``base`` (not included) hold."""
        self.total += await allocated_ranges(top, base, top.size, self.dirty)

    def bottom(self) -> Node | None:
        """What sync=top copies down to (not included): the source's backing file."""
        assert self.source is not None
        backing = self.source.children.get("backing")
        return backing.node if backing is not None else None

    async def copy_dirty(self) -> None:
        """Copy until nothing is dirty (new writes may add ranges meanwhile), several chunks
        at once: each under the range lock a guest write to it takes too, so a write racing
        a copy either lands before it (and is copied) or after it (and is dirty again)."""
        source, edge = self.source, self.edge
        assert source is not None and edge is not None

        async def copy(start: int, end: int, buf: bytearray) -> None:
            async with self.locks.hold(start, end - start):
                await copy_range(source, edge, start, end, buf)
            if self.draining:  # the backend waits: no speed limit, no pause
                self.done += end - start
            else:
                await self.step(end - start)

        await self.copy_spans(
            lambda: self.dirty.pop_first(CHUNK),
            copy,
            lambda: bytearray(CHUNK),
            gated=not self.draining,
        )

    async def intercept(
        self, offset: int, length: int, call: Callable[[], Awaitable[None]]
    ) -> None:
        """A guest write through the filter: under the range lock, then dirty (or copied
        at once, in write-blocking mode)."""
        assert self.source is not None
        start = offset - offset % GRANULARITY
        end = min(
            -(-(offset + length) // GRANULARITY) * GRANULARITY,
            max(self.source.size, offset + length),
        )
        async with self.locks.hold(start, end - start):
            await call()
            if self.mode == "write-blocking" and self.edge is not None:
                await copy_range(self.source, self.edge, start, end, bytearray(end - start))
            else:
                self.total += self.dirty.add(start, end)

    # -- the switch, or the undo ------------------------------------------------------------

    async def finish(self) -> None:
        """job-complete: with the backend drained, copy what is left and switch the backend
        to the target (or, cancelled once ready, back to the source: the target keeps the
        copy of this moment)."""
        assert self.target is not None and self.source is not None
        target = self.target

        async def last_copy() -> None:
            self.draining = True
            await self.copy_dirty()
            await target.flush()
            self.detach_target()  # the backend's edge replaces the job's

        new = target if self.switch else self.source
        await self.backend_obj.change(
            f"node={new.name}", same_data=True, by=self, before_swap=last_copy
        )
        self.filtered = False
        self.layer.registry("jobs").pop(self.id, None)
        await self.close_target()  # the job's reference: the backend holds its own

    async def abort(self) -> None:
        if self.filtered and self.source is not None:
            await self.backend_obj.change(f"node={self.source.name}", same_data=True, by=self)
            self.filtered = False
        self.layer.registry("jobs").pop(self.id, None)
        await self.close_target()


class ActiveCommitJob(MirrorJob):
    """Commit of the active layer (QEMU's block-commit with top = the active layer): a mirror
    of what the layers above the base hold into the base, then a switch to the base, and the
    layers above it leave the chain."""

    type = "commit"
    target_perm = Perm.CONSISTENT_READ | Perm.WRITE
    """It writes into the base what its own chain shows already, but another overlay over
    the base would read it changed: such an overlay refuses the job (QEMU's rule)."""
    writes_below = True

    def __init__(
        self, manager: JobManager, job_id: str, backend: BlockBackend, base: Node, speed: int = 0
    ) -> None:
        super().__init__(manager, job_id, backend, base.name, "top", "background", speed)
        self.base = base
        self.was_read_only = base.read_only

    async def open_target(self) -> Node:
        if self.was_read_only:
            await self.layer.reopen_node(self.base.name, {"read-only": False})
        self.base.refcnt += 1  # the job's reference
        return self.base

    async def plan(self) -> None:
        assert self.source is not None
        await self.add_allocated(self.source, self.base)

    async def finish(self) -> None:
        await super().finish()
        if not self.switch:
            await self.restore_base()

    async def abort(self) -> None:
        await super().abort()
        await self.restore_base()

    async def restore_base(self) -> None:
        """The base turns read-only again if the job made it writable."""
        if self.was_read_only and self.base.refcnt and not self.base.read_only:
            await self.layer.reopen_node(self.base.name, {"read-only": True})


def check_node_target(
    cls: type[MirrorJob], backend: BlockBackend, target: Node, sync: Sync
) -> None:
    """An existing node as target: not part of the source, and, for a mirror that copies
    only the top (which the backend then switches to), with a backing file of its own."""
    if target in backend.layer.subtree(backend.root_node()):
        raise BlockError(
            errno.EINVAL,
            f"{cls.type}: target node '{target.name}' is part of "
            f"{backend.name}'s medium; give a node of its own",
        )
    if (
        cls.needs_completion
        and sync != "full"
        and "backing" not in target.children
        and len(chain(backend)) > 1
    ):
        raise BlockError(
            errno.EINVAL,
            f"{cls.type}: sync={sync} copies only the active "
            f"image, but target node '{target.name}' has no "
            "backing file: the backend would lose the data below",
        )


async def start_copy(
    cls: type[MirrorJob],
    manager: JobManager,
    backend: BlockBackend,
    job_id: str | None,
    target: str,
    fmt: str | None,
    sync: Sync,
    mode: Mode,
    existing: bool,
    speed: int,
    extra: Mapping[str, Any] | None = None,
) -> MirrorJob:
    """Start a mirror or a backup to the image ``target``, made for it unless ``existing``
    or an existing node (``node=NAME``), with ``extra`` arguments of the job's own; if the
    job cannot start, an image made for it is removed again."""
    job_id = manager.new_id(job_id, backend.name)
    options, created = await target_options(backend, target, fmt, sync, existing)
    if isinstance(options, str):
        check_node_target(cls, backend, manager.layer.find_node(options), sync)
    try:
        job = cls(manager, job_id, backend, options, sync, mode, speed, **(extra or {}))
        await manager.launch(job)
    except BaseException:
        if created:
            os.unlink(target)
        raise
    return job


class MirrorTopDriver(JobFilter):
    """In front of a mirror's (or an active commit's) source: each write marks its range
    dirty, or is copied to the target too (see :meth:`MirrorJob.intercept`)."""

    name = "mirror-top"
