"""A block job: a long copy that runs inside the daemon while its backend keeps serving.

QEMU's job model, simplified: a job is created, runs (pausing when asked), may become
ready (a mirror or an active commit in sync, waiting to be completed), and concludes, with
an error if it failed or was cancelled; a concluded job stays listed until dismissed. A job
never blocks I/O except for its atomic switch (a graph change, drained as any media change),
reports its progress (bytes done of bytes known), honours a speed limit, and leaves every
image consistent whether it completes, fails or is cancelled: what it writes to its target
is written in the target format's crash-safe order, and its switch either happens whole or
not at all.

Subclasses implement :meth:`Job.prepare` (what must work for the job to start at all: the
command that starts it fails otherwise, changing nothing), :meth:`Job.work` (the copy; it
calls :meth:`Job.step` after each chunk) and, where the graph changes at the end,
:meth:`Job.finish` (the switch) and :meth:`Job.abort` (undo what the job put into the
graph).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, TypeVar

import trio

from blkfs.errors import BlockError
from blkfs.info import JobInfo

if TYPE_CHECKING:
    from blkfs.jobs.manager import JobManager

log = logging.getLogger("blkfs.jobs")

IN_FLIGHT = 16
"""Chunks a job copies at once, as QEMU's mirror keeps up to 16 requests in flight: a chunk
waits for the host most of its time, so one at a time leaves both images idle in turn."""

Span = tuple[int, int]
T = TypeVar("T")


class JobStatus(StrEnum):
    """QMP's JobStatus values that blkfs jobs go through."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    """Ready and paused."""
    CONCLUDED = "concluded"


class Job:
    type: ClassVar[str]
    needs_completion: ClassVar[bool] = False
    """Goes ready and waits for job-complete (mirror, active commit)."""

    def __init__(self, manager: JobManager, job_id: str, backend: str, speed: int) -> None:
        self.manager = manager
        self.id = job_id
        self.backend = backend
        self.status = JobStatus.CREATED
        self.error: str | None = None
        self.done = 0
        """Bytes copied so far (QMP's current-progress)."""
        self.total = 0
        """Bytes this job knows it has to copy (QMP's total-progress; it may grow, as new
        writes make a mirror's target dirty)."""
        self.speed = speed
        self.paused = False
        self._unpaused = trio.Event()
        self._unpaused.set()
        self._scope = trio.CancelScope()
        self._completing = trio.Event()
        self.switch = True
        """Whether completing switches the backend to the target; a ready mirror that is
        cancelled completes without (QEMU's block-job-cancel after BLOCK_JOB_READY): the
        target keeps a copy of the moment."""
        self._concluded = trio.Event()
        self._budget_start = 0.0
        self._budget_bytes = 0
        self._throttled = trio.CancelScope()
        """The wait that keeps to the speed limit: a new limit ends it."""

    # -- what subclasses implement ----------------------------------------------------------

    async def prepare(self) -> None:
        """Open and check what the job needs, before it is listed and runs; what it opened,
        :meth:`abort` closes."""

    async def work(self) -> None:
        """Copy; call :meth:`step` after each chunk. A job that needs completion calls
        :meth:`wait_until_completed` once in sync, and keeps its target in sync meanwhile."""
        raise NotImplementedError

    async def finish(self) -> None:
        """The job's switch, after :meth:`work` returned (the backend is drained for it)."""

    async def abort(self) -> None:
        """Undo what the job put into the graph; the source stays as it was."""

    # -- progress, pause, speed --------------------------------------------------------------

    async def step(self, nbytes: int) -> None:
        """After a chunk: count it, wait while paused, keep to the speed limit, and let a
        cancellation in."""
        self.done += nbytes
        self.total = max(self.total, self.done)
        if self.speed:
            self._budget_bytes += nbytes
            ahead = self._budget_bytes / self.speed - (trio.current_time() - self._budget_start)
            if ahead > 0:
                with trio.CancelScope(deadline=trio.current_time() + ahead) as self._throttled:
                    await trio.sleep_forever()
        while self.paused:
            await self._unpaused.wait()
        await trio.lowlevel.checkpoint()

    async def copy_spans(
        self,
        next_span: Callable[[], Span | None],
        copy: Callable[[int, int, T], Awaitable[None]],
        scratch: Callable[[], T],
        *,
        gated: bool = True,
    ) -> None:
        """Copy every span ``next_span()`` hands out (None: nothing left now) with
        ``copy(start, end, buffers)``, :data:`IN_FLIGHT` at once, each worker with buffers
        of its own (made by ``scratch()``); ``copy`` counts its bytes. ``gated``: no span is taken
        while the job is paused, and with a speed limit one chunk is in flight at a time (a
        limit asks for a steady flow, not bursts of sixteen). Returns once every worker found
        nothing left; the first failure ends the others and is raised as it is."""
        one_at_a_time = trio.Lock()

        def admission() -> AbstractAsyncContextManager[object]:
            return one_at_a_time if gated and self.speed else nullcontext()

        async def worker() -> None:
            buffers: T | None = None  # made once there is work (a ready mirror polls)
            while True:
                async with admission():
                    while gated and self.paused:
                        await self._unpaused.wait()
                    span = next_span()
                    if span is None:
                        return
                    if buffers is None:
                        buffers = scratch()
                    await copy(*span, buffers)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(IN_FLIGHT):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_failure(group) from None

    def set_ready(self) -> None:
        self._set(JobStatus.STANDBY if self.paused else JobStatus.READY)
        self.manager.event("BLOCK_JOB_READY", self)

    @property
    def ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    @property
    def completing(self) -> bool:
        return self._completing.is_set()

    async def wait_until_completed(self, keep_in_sync: Callable[[], Awaitable[None]]) -> None:
        """Once in sync: become ready and, until job-complete, run ``keep_in_sync()``
        (an async function that copies what new writes made dirty, returning when there is
        nothing left) whenever there is work."""
        self.set_ready()
        while not self._completing.is_set():
            await keep_in_sync()
            with trio.move_on_after(0.05):
                await self._completing.wait()

    # -- control ----------------------------------------------------------------------------

    def pause(self) -> None:
        if self.status is JobStatus.CONCLUDED:
            raise BlockError(errno.EINVAL, f"job '{self.id}' has concluded")
        self.paused = True
        self._unpaused = trio.Event()
        self._set(JobStatus.STANDBY if self.ready else JobStatus.PAUSED)

    def resume(self) -> None:
        if not self.paused:
            raise BlockError(errno.EINVAL, f"job '{self.id}' is not paused")
        self.paused = False
        self._unpaused.set()
        self._budget_start, self._budget_bytes = trio.current_time(), 0
        self._set(JobStatus.READY if self.status is JobStatus.STANDBY else JobStatus.RUNNING)

    def set_speed(self, speed: int) -> None:
        self.speed = speed
        self._budget_start, self._budget_bytes = trio.current_time(), 0
        self._throttled.cancel()  # a wait under the old limit ends; the new one applies

    def complete(self) -> None:
        if not self.needs_completion:
            raise BlockError(errno.EINVAL, f"job '{self.id}' ({self.type}) completes by itself")
        if not self.ready:
            raise BlockError(
                errno.EINVAL,
                f"job '{self.id}' is not ready yet (status "
                f"{self.status.value}; {self.done} of "
                f"{self.total} bytes copied)",
            )
        self._completing.set()

    def cancel(self) -> None:
        if self.status is JobStatus.CONCLUDED:
            raise BlockError(errno.EINVAL, f"job '{self.id}' has concluded")
        if self.ready:
            self.switch = False
            self._completing.set()
            self.resume_if_paused()
            return
        self.error = "cancelled"
        self._scope.cancel()
        self.resume_if_paused()

    def resume_if_paused(self) -> None:
        if self.paused:
            self.paused = False
            self._unpaused.set()

    async def wait(self) -> None:
        await self._concluded.wait()

    # -- the life of a job ------------------------------------------------------------------

    async def run(self) -> None:
        """The job's task: work, then switch or undo, then conclude."""
        self._budget_start = trio.current_time()
        self._set(JobStatus.RUNNING)
        try:
            with self._scope:
                await self.work()
            with trio.CancelScope(shield=True):
                if self._scope.cancelled_caught:
                    await self.abort()
                else:
                    await self.finish()
        except trio.Cancelled:  # the daemon stops: leave every image consistent
            self.error = "cancelled: the daemon is shutting down"
            with trio.CancelScope(shield=True):
                await self._abort_logged()
            raise
        except BlockError as exc:
            self.error = str(exc)
            log.warning(
                "job %s (%s on %s) failed: %s", self.id, self.type, self.backend, self.error
            )
            with trio.CancelScope(shield=True):
                await self._abort_logged()
        finally:  # QEMU's order: the job's end, then its status
            self.manager.event(
                "BLOCK_JOB_CANCELLED" if self.error == "cancelled" else "BLOCK_JOB_COMPLETED", self
            )
            self._set(JobStatus.CONCLUDED)
            self._concluded.set()
            log.info(
                "job %s (%s on %s) concluded%s",
                self.id,
                self.type,
                self.backend,
                f": {self.error}" if self.error else "",
            )

    async def _abort_logged(self) -> None:
        try:
            await self.abort()
        except BlockError as undo:
            log.error("job %s: undoing it failed too: %s", self.id, undo)

    def _set(self, status: JobStatus) -> None:
        if status is not self.status:
            self.status = status
            self.manager.event("JOB_STATUS_CHANGE", self)

    def info(self) -> JobInfo:
        """What query-jobs (and .ctl/jobs) shows, with QMP's names."""
        return {
            "id": self.id,
            "type": self.type,
            "device": self.backend,
            "status": self.status.value,
            "current-progress": self.done,
            "total-progress": self.total,
            "speed": self.speed,
            "error": self.error,
            "ready": self.ready,
        }


def first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a group of workers' exceptions amounts to for the job: the first that is not a
    cancellation (a BlockError the job reports), else a cancellation (the job's or the
    daemon's), which :meth:`Job.run` tells apart as it does for one task."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        else:
            leaves.append(exc)
    return next((exc for exc in leaves if not isinstance(exc, trio.Cancelled)), leaves[0])
