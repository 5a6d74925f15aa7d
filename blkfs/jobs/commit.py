"""Commit (QEMU's block-commit): the data the images from ``top`` down to ``base`` hold
is copied into the base, and those images leave the chain.

With ``top`` the active image this is an active commit, a mirror into the base
(:class:`~blkfs.jobs.mirror.ActiveCommitJob`): it goes ready and, completed, switches the
backend to the base. Below the active image nothing writes the committed images (they are
backing files): the base is written only with what the chain above shows already, so the
chain's readers see no change at any moment, and at the end the image above ``top`` takes
the base as its backing file (in the graph and in its header). A ``commit-top`` filter
between that image and ``top`` lets the job write the base (see :mod:`blkfs.jobs.filter`);
any other image over the base, or reader of an image between, refuses it before a byte is
copied: it would read the base changed. Failed or cancelled, the chain is as it was (the
base may hold some of the data, which the chain above still covers).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from blkfs.block import Child, Node, Perm
from blkfs.block.perm import ALL, NO_PERM
from blkfs.errors import BlockError
from blkfs.jobs.chain import backing_name, chain, find_layer, overlay_of
from blkfs.jobs.filter import JobFilter
from blkfs.jobs.mirror import ActiveCommitJob

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.jobs.manager import JobManager


class CommitJob(ActiveCommitJob):
    needs_completion = False

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        backend: BlockBackend,
        top: Node,
        base: Node,
        speed: int = 0,
    ) -> None:
        super().__init__(manager, job_id, backend, base, speed)
        self.top = top
        self.overlay = overlay_of(top)
        self.inserted = False
        """The ``commit-top`` filter is over ``top``."""

    async def prepare(self) -> None:
        self.source = self.top
        self.layer.registry("jobs")[self.id] = self
        await self.layer.insert_filter(
            self.overlay, "backing", {"driver": "commit-top", "job": self.id, "read-only": True}
        )
        self.inserted = True
        self.target = await self.open_target()
        self.attach_target()

    async def work(self) -> None:
        await self.add_allocated(self.top, self.base)
        await self.copy_dirty()

    async def finish(self) -> None:
        """The image above ``top`` takes the base as its backing file (the filter goes)."""
        assert self.target is not None
        await self.target.flush()
        self.detach_target()
        await self.layer.set_backing(self.overlay, self.base, backing_name(self.overlay, self.base))
        self.inserted = False
        self.layer.registry("jobs").pop(self.id, None)
        await self.close_target()
        await self.restore_base()

    async def abort(self) -> None:
        if self.inserted:
            await self.layer.remove_filter(self.overlay, "backing")
            self.inserted = False
        await super().abort()


def commit(
    manager: JobManager,
    backend: BlockBackend,
    job_id: str | None,
    top: str | None,
    base: str | None,
    speed: int,
) -> ActiveCommitJob:
    """The commit job asked for: ``top`` defaults to the active image, ``base`` to the last
    backing file (QEMU's defaults); both are node names or image file names."""
    layers = chain(backend)
    top_node = find_layer(backend, layers, top, "top") if top else layers[0]
    base_node = find_layer(backend, layers, base, "base") if base else layers[-1]
    if layers.index(base_node) <= layers.index(top_node):
        raise BlockError(
            errno.EINVAL,
            f"commit: the base ('{base_node.name}') must lie below "
            f"the top ('{top_node.name}') in {backend.name}'s chain"
            f"{'' if len(layers) > 1 else ' (it has one image)'}",
        )
    job_id = manager.new_id(job_id, backend.name)
    if top_node is layers[0]:
        return ActiveCommitJob(manager, job_id, backend, base_node, speed)
    return CommitJob(manager, job_id, backend, top_node, base_node, speed)


class CommitTopDriver(JobFilter):
    """Over the top image of a commit below the active one: the overlay above reads through
    it, and the images below are the job's (QEMU's commit_top needs nothing, shares all)."""

    name = "commit-top"

    def child_perm(
        self, child: Child, writable: bool, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm]:
        return NO_PERM, ALL
