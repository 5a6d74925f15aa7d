"""The jobs of one BlockLayer: where they run, by id, and who hears of their events."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from blkfs.errors import BlockError, NotFound
from blkfs.info import JobInfo
from blkfs.jobs.job import Job, JobStatus

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.jobs")

JobListener = Callable[[str, Job], None]
"""Called with a QMP event name (JOB_STATUS_CHANGE, BLOCK_JOB_READY, ...) and the job."""


class JobManager:
    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.jobs: dict[str, Job] = {}
        self.listeners: list[JobListener] = []
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run jobs until :meth:`stop`; then cancel those still running (each leaves its
        images consistent) and wait for them."""
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._nursery = None

    def stop(self) -> None:
        self._scope.cancel()

    def new_id(self, given: str | None, backend: str) -> str:
        """The id of a new job: as given, else the backend's name (as QEMU's default). A
        concluded job of that id makes way (dismissed)."""
        job_id = given or backend
        old = self.jobs.get(job_id)
        if old is not None:
            if old.status is not JobStatus.CONCLUDED:
                raise BlockError(
                    errno.EEXIST,
                    f"job '{job_id}' ({old.type}) is still running; give another job-id=",
                )
            del self.jobs[job_id]
        return job_id

    async def launch(self, job: Job) -> Job:
        """Prepare the job and start it; if preparing fails, undo it and raise (the command
        fails, changing nothing). From the start until it concludes, the job holds its
        backend still: no other change of it is allowed (QEMU's op blockers)."""
        if self._nursery is None:
            raise BlockError(errno.EAGAIN, "jobs run only inside a running daemon")
        backend = self.layer.find(job.backend)
        backend.check_op("start another job")
        self.layer.block(
            backend,
            job,
            f"job '{job.id}' ({job.type}) is running on it",
            f"once it has ended, or after job-cancel {job.id}",
        )
        try:
            await job.prepare()
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await job.abort()
                finally:
                    self.layer.unblock(backend, job)
            raise
        self.jobs[job.id] = job
        self._nursery.start_soon(self._run, job, backend, name=f"job {job.id}")
        log.info("job %s: %s on %s started", job.id, job.type, job.backend)
        return job

    async def _run(self, job: Job, backend: BlockBackend) -> None:
        try:
            await job.run()
        finally:
            self.layer.unblock(backend, job)

    def find(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound("job", job_id, f"no job named '{job_id}'")
        return job

    def dismiss(self, job_id: str) -> None:
        job = self.find(job_id)
        if job.status is not JobStatus.CONCLUDED:
            raise BlockError(errno.EBUSY, f"job '{job_id}' has not concluded")
        del self.jobs[job_id]

    def event(self, name: str, job: Job) -> None:
        for listener in list(self.listeners):
            listener(name, job)

    def status(self) -> list[JobInfo]:
        return [job.info() for job in self.jobs.values()]
