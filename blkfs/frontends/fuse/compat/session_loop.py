"""Take a queued FUSE request without a trip through trio's scheduler.

pyfuse3 3.x's session loop awaits its private ``_wait_fuse_readable()`` before reading each
request. That takes a trio Lock (a checkpoint: one pass of trio's run loop, with an
``epoll_wait``) and then waits in epoll (a second pass and an ``epoll_ctl``), so every
request pays two scheduler passes even while the kernel holds a queue of them; with four
readers that was where the daemon's one core went.

:func:`install` puts a :class:`FuseWait` in its place, which polls the /dev/fuse descriptor
without blocking first: a queued request is read at once, and only an idle daemon waits in
epoll. It also wraps ``pyfuse3.terminate`` so that the wait learns the session is ending
(pyfuse3 checks that inside its own wait, with state Python cannot read).

Checked on pyfuse3 3.5.0 with libfuse 3.14 and trio 0.35 (pyproject.toml keeps pyfuse3 below
3.6 for it). Fallback: if pyfuse3 no longer has the hook, or the process holds no /dev/fuse
descriptor, nothing is replaced (a debug log line says so) and pyfuse3's own loop runs
unchanged, one scheduler pass slower per request.

Before sleeping in epoll, the waiter busy-polls for a while, as QEMU's iothreads do
(``poll-max-ns``, :class:`AdaptivePoll`): a daemon asleep on one CPU is woken by an
interprocessor interrupt when the reader on the other CPU sends its next request, which on a
2-vCPU VM cost more than the request itself (4 KiB reads at queue depth 1: 15k IOPS with the
reader on the other CPU, 57k on the same one; polling: 23.5k).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections import deque

import pyfuse3
import trio

log = logging.getLogger("blkfs.fuse")

FAIR_SPAN = 16
"""Requests taken back to back before the taker lets the scheduler run other tasks (flushes
in worker threads, signals, invalidations), which would otherwise wait for an idle moment."""

POLL_MAX_NS = 65536
"""The longest busy-poll before sleeping. Twice QEMU's iothread default: at queue depth 1
the next request came 20-35 us after a reply on the 2-vCPU VM of the benchmark, so 32 us
polls missed about half of them (4 KiB reads: 14-20k IOPS, against 23.5k with 64 us)."""

_stock_terminate = pyfuse3.terminate


class AdaptivePoll:
    """How long to busy-poll before sleeping, adapted as QEMU's AioContext does
    (``adjust_polling_time`` in util/aio-posix.c, with its default grow and shrink): a request
    that came within the poll time leaves it as it is; one that came later but sooner than
    ``max_ns`` doubles it (from 4 us); a longer wait stops polling. An idle daemon therefore
    polls once, for at most ``max_ns``, and then sleeps until requests come close together."""

    START_NS = 4000

    def __init__(self, max_ns: int) -> None:
        self.max_ns = max_ns
        self.ns = 0

    def record(self, waited_ns: int) -> None:
        """A request came ``waited_ns`` after the wait for it began."""
        if waited_ns <= self.ns:
            return
        if waited_ns > self.max_ns:
            self.ns = 0
        elif waited_ns < self.max_ns and self.ns < self.max_ns:
            self.ns = min(self.max_ns, self.ns * 2 if self.ns else self.START_NS)


class FuseWait(trio.abc.Instrument):
    """pyfuse3's ``_wait_fuse_readable``, faster: True once a request can be read without
    blocking, False when the session ends.

    One task at a time waits in epoll (trio allows one reader per fd); the others park. A
    worker that takes a request wakes another to watch for the next one only if its
    request suspends (trio's ``after_task_step`` for a worker that has not come back here):
    one served at once (the short path) comes back and watches itself, and a worker woken
    for nothing, which only parks again, cost a third of a request's instructions. No
    worker ends while the session lives: pyfuse3 starts a new worker after every request it
    reads while none is inside its own wait (with this wait, always), up to its
    ``max_tasks``, so a worker that ended would be replaced by a new task for the next
    request. Workers that have served park above those that have not and are woken first,
    so a few take turns and few 1 MiB request buffers are ever touched.
    """

    def __init__(self, fd: int, poll_max_ns: int = POLL_MAX_NS) -> None:
        self.fd = fd
        self.polling = AdaptivePoll(poll_max_ns)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._epoll_waiter = False
        self._yielding = 0
        self._parked: deque[trio.lowlevel.Task] = deque()
        self._woken = 0
        """Parked workers rescheduled that have not run yet."""
        self._served: set[trio.lowlevel.Task] = set()
        self._closed = False
        self._streak = 0
        self._taker: trio.lowlevel.Task | None = None
        """The worker that took the last request and has not come back for another."""
        trio.lowlevel.add_instrument(self)

    def close(self) -> None:
        """The session ends: every wait, now and later, returns False."""
        self._closed = True
        while self._parked:
            self._wake_one()
        with contextlib.suppress(KeyError, RuntimeError):  # closed twice, or outside trio
            trio.lowlevel.remove_instrument(self)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        """A worker's request suspended before it came back: someone must watch for the
        next one."""
        if task is self._taker:
            self._taker = None
            if not self._epoll_waiter:
                self._wake_one()

    async def __call__(self) -> bool:
        task = trio.lowlevel.current_task()
        if self._taker is task:
            self._taker = None
        if self._streak >= FAIR_SPAN:
            self._streak = 0
            self._yielding += 1  # this one comes back: parked workers need not step in
            try:
                await trio.lowlevel.checkpoint()
            finally:
                self._yielding -= 1
        while not self._closed:
            served = task in self._served
            if not served and (self._epoll_waiter or self._yielding):
                await self._park(served)
                continue
            # Nothing between this poll and pyfuse3's read of the request awaits, so no
            # other task can take the request this poll saw.
            if self._poll.poll(0):
                self._streak += 1
                return self._take(task, served)
            self._streak = 0
            if self._epoll_waiter:
                await self._park(served)
                continue
            began = time.perf_counter_ns()
            if self._busy_poll(began):
                return self._take(task, served)
            self._epoll_waiter = True
            try:
                await trio.lowlevel.wait_readable(self.fd)
                self.polling.record(time.perf_counter_ns() - began)
            except trio.ClosedResourceError:  # pyfuse3.terminate() closing the fd
                self.close()
            finally:
                self._epoll_waiter = False
        return False

    def _take(self, task: trio.lowlevel.Task, served: bool) -> bool:
        """``task`` (which has ``served`` before) reads the request that is there."""
        if not served:
            self._served.add(task)
        self._taker = task
        return True

    def _busy_poll(self, began: int) -> bool:
        """Poll for a request for the adaptive poll time if no task but woken workers (which
        only park again) could run, so the loop would sleep now anyway; True if one came."""
        if not self.polling.ns or trio.lowlevel.current_statistics().tasks_runnable > self._woken:
            return False
        end = began + self.polling.ns
        while True:
            if self._poll.poll(0):
                self.polling.record(time.perf_counter_ns() - began)
                return True
            if time.perf_counter_ns() >= end:
                return False

    def _wake_one(self) -> None:
        if self._parked:
            trio.lowlevel.reschedule(self._parked.pop())
            self._woken += 1

    async def _park(self, served: bool) -> None:
        """Sleep until a wake reschedules this task (lighter than a trio.Event per park)."""
        task = trio.lowlevel.current_task()
        if served:
            self._parked.append(task)
        else:
            self._parked.appendleft(task)

        def abort(_: object) -> trio.lowlevel.Abort:  # cancelled: no later wake may find it
            self._parked.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        self._woken -= 1


def fuse_fd() -> int | None:
    """The process's /dev/fuse descriptor (pyfuse3 does not expose it)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def install(poll_max_ns: int) -> bool:
    """Put a :class:`FuseWait` into pyfuse3; call it once the session is mounted and
    before a worker waits a second time (``Operations.init`` is such a place). True if
    installed."""
    fd = fuse_fd()
    if fd is None or not hasattr(pyfuse3, "_wait_fuse_readable"):
        log.debug("pyfuse3's request loop left as it is")
        return False
    wait = FuseWait(fd, poll_max_ns)

    def terminate() -> None:
        wait.close()
        _stock_terminate()

    pyfuse3._wait_fuse_readable = wait
    pyfuse3.terminate = terminate
    return True
