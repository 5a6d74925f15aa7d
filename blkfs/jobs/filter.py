"""What the filters block jobs put in front of a live source have in common. Each job's
filter is declared beside the job: ``mirror-top`` (a mirror, an active commit,
:mod:`blkfs.jobs.mirror`) and ``copy-before-write`` (a backup, :mod:`blkfs.jobs.backup`),
QEMU's names, and ``stream-top`` (a stream, :mod:`blkfs.jobs.stream`); and ``commit-top``,
QEMU's too, which a commit below the active image puts between the images it commits and the
overlay above them (:mod:`blkfs.jobs.commit`).

Each passes every request through, and hands each write, zero write and discard to its
job first, which decides what happens around it: a mirror marks the range dirty, or in
write-blocking mode writes it to its target too; a backup copies the range's old data to its
target before the write may change it; a stream keeps the write apart from its own copy of
the range. The job is found by its id in the graph's job
registry (``job=ID``); jobs create these nodes themselves (users need not).

A commit writes the base beneath the chain its filter stands on: the filter lets it (shares
write) and needs no consistent read of the chain, so the chain's backing files let the job
write the base while every other reader of the base still refuses it (QEMU's mirror_top
and commit_top permissions, block/mirror.c and block/commit.c).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from blkfs.block import REQUIRED, BlockDriver, Child, ChildSpec, Option, Perm, WriteFlags
from blkfs.errors import BlockError


class WriteHook(Protocol):
    """What a job does around a write that passes its filter."""

    writes_below: bool
    """The job writes the backing chain below its filter (a commit)."""

    async def intercept(
        self, offset: int, length: int, call: Callable[[], Awaitable[None]]
    ) -> None: ...


class JobFilter(BlockDriver):
    is_filter = True
    options = {"job": Option("str", REQUIRED, "the id of the job this filter works for")}
    children = {"file": ChildSpec(help="the job's source")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        job = self.node.registry("jobs").get(values["job"])
        if job is None:
            raise BlockError(
                errno.EINVAL,
                f"{self.name}: no running job '{values['job']}' "
                "(block jobs make these nodes themselves)",
            )
        self.job: WriteHook = job

    def child_perm(
        self, child: Child, writable: bool, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm]:
        nperm, nshared = super().child_perm(child, writable, perm, shared)
        job = self.node.registry("jobs").get(self.node.values["job"])
        if job is not None and job.writes_below:
            return nperm & ~Perm.CONSISTENT_READ, nshared | Perm.WRITE
        return nperm, nshared

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self.job.intercept(
            offset, data.nbytes, lambda: self.filtered.write(offset, data, flags)
        )

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self.job.intercept(
            offset, length, lambda: self.filtered.write_zeroes(offset, length, unmap, flags)
        )

    async def discard(self, offset: int, length: int) -> None:
        await self.job.intercept(offset, length, lambda: self.filtered.discard(offset, length))
