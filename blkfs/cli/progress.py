"""Following a job's progress: a bar on a terminal, plain lines otherwise (logs, pipes).

Both take the job's entry as ``query-jobs`` gives it, so they follow a job in a daemon (read
from ``.ctl/jobs.json``) and one running in-process (``blkfs image convert -p``) alike.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Awaitable, Callable

import trio
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from blkfs.errors import BlockError
from blkfs.frontends.text import human_size
from blkfs.info import JobInfo

POLL = 0.1
"""Most seconds between two looks at a job."""
SOON = 0.01
"""Fewest seconds between two looks: once a job is about to end, or to go ready, or has
been told to complete, the next look comes this soon (a look every POLL would add half of
POLL to every job, a quarter of what `blkfs image convert` of 512 MiB takes)."""


class JobProgress:
    """Shows a job's progress on stderr: a bar on a terminal; else a line when the status
    changes or another tenth is done."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last: tuple[str, int] | None = None
        self.bar: Progress | None = None
        self.task = TaskID(0)
        if sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(label, total=None)

    def __enter__(self) -> JobProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, job: JobInfo) -> None:
        done, total = job["current-progress"], job["total-progress"]
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=done,
                total=total or None,
                description=f"{self.label}: {job['type']} {job['status']}",
            )
            return
        measured = total or job["status"] == "concluded"  # a job's size comes after its start
        tenth = 10 * done // total if total else 10 if measured else -1
        if (job["status"], tenth) != self.last:
            self.last = job["status"], tenth
            figures = (
                f"{human_size(done)} of {human_size(total)} "
                f"({100 * done // total if total else 100}%)"
                if measured
                else "(size not known yet)"
            )
            print(
                f"{self.label}: {job['type']} {job['status']} {figures}",
                file=sys.stderr,
                flush=True,
            )


async def follow(
    label: str,
    entry: Callable[[], Awaitable[JobInfo]],
    complete: Callable[[], Awaitable[None]] | None,
    show: bool = True,
    until_ready: bool = True,
) -> JobInfo:
    """Follow a job (``entry()`` gives its ``query-jobs`` entry) until it concludes; once it
    is ready, ``complete()`` it, or without ``complete`` return then (unless not
    ``until_ready``: someone else completes or cancels it). Shows the progress if ``show``;
    returns the job's last entry."""
    completed = False
    started = trio.current_time()
    with JobProgress(label) if show else contextlib.nullcontext() as display:
        while True:
            job = await entry()
            if display is not None:
                display.update(job)
            if job["status"] == "concluded":
                return job
            if job["ready"] and not completed and (complete is not None or until_ready):
                if complete is None:
                    return job
                await complete()
                completed = True
            await trio.sleep(next_look(job, trio.current_time() - started, completed))


def next_look(job: JobInfo, elapsed: float, completed: bool) -> float:
    """Seconds until the next look at ``job``, followed for ``elapsed`` seconds: SOON once
    it was told to complete, POLL while it waits ready for someone else; else the time its
    copy needs to end at the rate it has kept, within [SOON, POLL]."""
    if completed:
        return SOON
    done, left = job["current-progress"], job["total-progress"] - job["current-progress"]
    if job["ready"] or done <= 0:
        return POLL
    return min(POLL, max(SOON, left * elapsed / done))


def job_failure(job: JobInfo) -> BlockError | None:
    """The error to report for a concluded job, or None if it succeeded."""
    if not job["error"]:
        return None
    return BlockError(
        errno.ECANCELED if job["error"].startswith("cancelled") else errno.EIO,
        f"job {job['id']} ({job['type']} on {job['device']}): {job['error']}",
    )
