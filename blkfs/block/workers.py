"""Where host calls that may block go: worker threads (QEMU's thread pool,
util/thread-pool.c) or the kernel's io_uring (:class:`RingDoor`, QEMU's aio=io_uring).

Ground rules: the event loop never waits on a device. A host call that may block (a read the
page cache cannot serve at once, a write, fallocate, lseek, fdatasync, ftruncate) runs on a
worker thread or in the kernel's io_uring, and the task that asked sleeps until it returns.
That sleep cannot be cancelled: the call cannot be taken back, and it owns the caller's
buffer until it returns.
The one exception is a node let go with force=on (:meth:`HostQueue.let_go`): its callers are
answered with an error at once, and the node's host file stays open until the calls return.

Threads are shared by every node and made on demand (an idle one exits after
:data:`IDLE_SECONDS`). Each node's calls go through its own :class:`HostQueue`, which runs at
most ``limit`` of them at once: a device that stops answering holds that many threads, and
every other node still gets its own.

Completions come back in batches: a worker appends the result to a list and writes an eventfd
only when the list was empty; one system task of the loop waits on the eventfd and wakes every
caller whose call is done. One round trip costs 21 us at the median here (p99 49-114 us),
against 60 us (p99 1.5-2.4 ms) for ``trio.to_thread.run_sync`` and 26 us for a wake-up per
completion through ``TrioToken.run_sync_soon``; with four callers at once, 9-12 us a call
against 82-108 us (2-vCPU VM, loaded; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, TypeVar

import outcome
import trio

from .uring import FSYNC_DATASYNC, OP_FSYNC, OP_READ, OP_WRITE, Pinned, Ring

T = TypeVar("T")

IDLE_SECONDS = 10.0
"""A worker with nothing to do for this long exits."""

_Job = tuple[Callable[..., Any], tuple[Any, ...], "HostCall"]


class HostCall:
    """One call on a worker: who waits for it (None once answered early, see
    :meth:`HostQueue.let_go`) and since when it runs."""

    __slots__ = ("early", "queue", "started", "task", "waiting")

    def __init__(self, queue: HostQueue, task: trio.lowlevel.Task) -> None:
        self.queue = queue
        self.task: trio.lowlevel.Task | None = task
        self.started = perf_counter_ns()
        self.waiting = False
        self.early: outcome.Outcome[Any] | None = None
        """The outcome, if it came while the call was being started (an io_uring request
        the kernel completed during its submission): the task need not sleep."""

    def returned(self, result: outcome.Outcome[Any]) -> None:
        """The call came back (in the loop): wake its task, or only free its place if its
        task was answered already."""
        if self.task is None:
            self.queue._finished(self)
        elif self.waiting:
            trio.lowlevel.reschedule(self.task, result)
        else:
            self.early = result


class WorkerPool:
    """The threads of the process, their job queue and their completion eventfd."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        """Threads waiting for a job that no submitted job has been promised to."""
        self._done: list[tuple[Callable[[outcome.Outcome[Any]], None], outcome.Outcome[Any]]] = []
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._reaping: trio.lowlevel.RunVar[bool] = trio.lowlevel.RunVar("reaping", False)

    def submit(self, call: Callable[..., Any], args: tuple[Any, ...], host: HostCall) -> None:
        """Run ``call(*args)`` on a worker; ``host`` hears of its outcome in the loop."""
        self.expect()
        job = (call, args, host)
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=(job,), name="blkfs-worker", daemon=True).start()

    def _work(self, job: _Job | None) -> None:
        while True:
            if job is None:
                try:
                    job = self._jobs.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():  # else a job was promised to a waiting thread
                            self._idle -= 1
                            return
                    continue
            call, args, host = job
            job = None
            result = outcome.capture(call, *args)
            with self._lock:
                self._idle += 1
            self.deliver(host.returned, result)

    def expect(self) -> None:
        """In the loop, before anything may :meth:`deliver`: the completions are reaped."""
        if not self._reaping.get():
            self._reaping.set(True)
            trio.lowlevel.spawn_system_task(self._reap, name="blkfs host I/O completions")

    def deliver(
        self, done: Callable[[outcome.Outcome[Any]], None], result: outcome.Outcome[Any]
    ) -> None:
        """From any thread (a worker, or a library's own completion thread): ``done`` is
        called with ``result`` in the loop, in a batch with the others that are done."""
        with self._lock:
            self._done.append((done, result))
            wake = len(self._done) == 1
        if wake:
            os.eventfd_write(self._wakeup, 1)

    async def _reap(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._wakeup)
                try:
                    os.eventfd_read(self._wakeup)
                except BlockingIOError:
                    pass
                with self._lock:
                    done, self._done = self._done, []
                for call, result in done:
                    call(result)
        finally:
            self._reaping.set(False)


@functools.cache
def shared_pool() -> WorkerPool:
    """The process's one pool, made at first use (after a daemon has forked)."""
    return WorkerPool()


class RingDoor:
    """The loop's io_uring (:class:`~blkfs.block.uring.Ring`, one per trio run): reads,
    writes and fdatasync go to the kernel with no thread of ours. A request the kernel
    completes during its submission (a read from the page cache, a write that did not
    block) is answered at once; the others are reaped by a system task woken by the ring's
    eventfd. Each request's buffer stays pinned until its completion, whether or not its
    caller was answered early (:meth:`HostQueue.let_go`)."""

    def __init__(self, per_node: int) -> None:
        self.ring = Ring()
        self.per_node = per_node
        self._nodes = 0
        self._flight: dict[int, tuple[HostCall, Pinned | None]] = {}
        self._keys = itertools.count()
        try:
            self.ring.limit_workers(per_node)  # refused by kernels before 5.15: no ring then
        except OSError:
            self.ring.close()
            raise
        trio.lowlevel.spawn_system_task(self._reap, name="blkfs io_uring completions")

    def attach(self) -> None:
        """One more node uses the ring: the kernel may run ``per_node`` more of its requests
        on workers, so a node whose device hangs with all its requests on them leaves room
        for every other node (as :class:`HostQueue` does for threads)."""
        self._nodes += 1
        self.ring.limit_workers(self.per_node * (self._nodes + 1))

    def detach(self) -> None:
        """A node that used the ring is closed and none of its requests is in flight."""
        self._nodes -= 1

    def read(self, fd: int, buf: memoryview, offset: int) -> Callable[[HostCall], None]:
        """A read into ``buf`` at ``offset``; the outcome is the count read."""
        return lambda host: self._begin(host, OP_READ, fd, buf, offset, 0)

    def write(
        self, fd: int, data: memoryview, offset: int, flags: int = 0
    ) -> Callable[[HostCall], None]:
        """A write of ``data`` at ``offset`` with pwritev2's ``flags``; the outcome is the
        count written."""
        return lambda host: self._begin(host, OP_WRITE, fd, data, offset, flags)

    def fdatasync(self, fd: int) -> Callable[[HostCall], None]:
        return lambda host: self._begin(host, OP_FSYNC, fd, None, 0, FSYNC_DATASYNC)

    def _begin(
        self, host: HostCall, opcode: int, fd: int, buf: memoryview | None, offset: int, flags: int
    ) -> None:
        pin = None if buf is None else Pinned(buf, writable=opcode == OP_READ)
        key = next(self._keys)
        self._flight[key] = (host, pin)
        try:
            address, length = (0, 0) if pin is None else (pin.address, pin.length)
            while not self.ring.push(opcode, fd, address, length, offset, flags, key):
                self.ring.submit()
            self.ring.submit()
        except BaseException:
            del self._flight[key]
            if pin is not None:
                pin.release()
            raise
        self._complete()

    def _complete(self) -> None:
        for key, result in self.ring.reap():
            host, pin = self._flight.pop(key)
            if pin is not None:
                pin.release()
            if result < 0:
                host.returned(outcome.Error(OSError(-result, os.strerror(-result))))
            else:
                host.returned(outcome.Value(result))

    async def _reap(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.ring.eventfd)
                while True:
                    try:  # cleared before looking: a completion after this signals again
                        os.eventfd_read(self.ring.eventfd)
                    except BlockingIOError:
                        pass
                    if not self.ring.waiting():
                        break
                    self._complete()  # posting held completions signals the eventfd
        finally:
            _ring.set(None)
            if not self._flight:  # else the kernel may still fill their buffers: kept
                self.ring.close()


_ring: trio.lowlevel.RunVar[RingDoor | None] = trio.lowlevel.RunVar("ring", None)


def ring_door(per_node: int) -> RingDoor:
    """This trio run's ring, made at first use with room for ``per_node`` kernel workers per
    node; OSError if the kernel refuses io_uring (``kernel.io_uring_disabled``, a seccomp
    filter, a kernel without it)."""
    door = _ring.get()
    if door is None:
        door = RingDoor(per_node)
        _ring.set(door)
    return door


def _abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


async def completion(start: Callable[[Callable[[outcome.Outcome[Any]], None]], None]) -> Any:
    """Call ``start(done)``, which begins an operation that another thread ends by calling
    ``done(outcome)`` once (a library's asynchronous API: librbd's completions), and sleep
    until it does; the outcome's value is returned or its exception raised. Like a worker's
    call, the sleep cannot be cancelled: the operation owns the caller's buffer until done.
    If ``start`` raises, nothing was begun and its exception is raised here."""
    pool = shared_pool()
    pool.expect()
    task = trio.lowlevel.current_task()
    start(functools.partial(pool.deliver, functools.partial(trio.lowlevel.reschedule, task)))
    return await trio.lowlevel.wait_task_rescheduled(_abort)


class HostQueue:
    """One node's door to the workers: at most ``limit`` of its calls run at once, the
    others wait their turn in order; :attr:`calls` tells how long each running one has."""

    __slots__ = ("_returned", "_waiting", "calls", "gone", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._waiting: deque[trio.lowlevel.Task] = deque()
        self.calls: dict[HostCall, None] = {}
        """The calls on workers, oldest first (answered ones included until they return)."""
        self._returned: Callable[[], None] | None = None
        self.gone: Callable[[], BaseException] | None = None
        """Set by :meth:`let_go`: every later call fails at once with an exception it makes."""

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on a worker thread; its exception is raised here. Once the call
        has started, cancellation waits for it to return (see the module's ground rules),
        unless :meth:`let_go` answers it first."""
        result: T = await self.start(lambda host: shared_pool().submit(call, args, host))
        return result

    async def start(self, begin: Callable[[HostCall], None]) -> Any:
        """Wait for this node's turn, ``begin`` the call (on a worker thread, or in the
        kernel: :class:`RingDoor`), and return its outcome once ``begin``'s
        :class:`HostCall` has it."""
        if self.gone is not None:
            raise self.gone()
        if self.running >= self.limit or self._waiting:
            await self._wait_turn()
        else:
            self.running += 1
        host = HostCall(self, trio.lowlevel.current_task())
        self.calls[host] = None
        try:
            begin(host)
            if host.early is not None:
                return host.early.unwrap()
            host.waiting = True
            return await trio.lowlevel.wait_task_rescheduled(_abort)
        finally:
            if host.task is not None:  # returned; else it keeps its place until it does
                self._finished(host)

    async def _wait_turn(self) -> None:
        task = trio.lowlevel.current_task()
        self._waiting.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiting.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)  # running was counted for us

    def _finished(self, host: HostCall) -> None:
        del self.calls[host]
        if self._waiting:
            trio.lowlevel.reschedule(self._waiting.popleft())  # its turn, counted
            return
        self.running -= 1
        if not self.calls and self._returned is not None:
            returned, self._returned = self._returned, None
            returned()

    def let_go(self, error: Callable[[], BaseException]) -> int:
        """If a call is in flight, answer it and every call waiting its turn with an
        exception ``error()`` makes, now, and every later one too (a device that does not
        answer, given up with force=on: the node is on its way out, and its close must not
        wait on the device either). Each caller gets an exception of its own: one instance
        raised again and again would grow its traceback at every raise. The calls themselves
        cannot be taken back: they keep their threads and buffers until they return. A queue
        with nothing in flight is left as it is. Returns how many requests were answered."""
        if not self.calls and not self._waiting:
            return 0
        self.gone = error
        answered = 0
        for host in self.calls:
            if host.task is not None:
                trio.lowlevel.reschedule(host.task, outcome.Error(error()))
                host.task = None
                answered += 1
        while self._waiting:
            trio.lowlevel.reschedule(self._waiting.popleft(), outcome.Error(error()))
            answered += 1
        return answered

    def when_returned(self, then: Callable[[], None]) -> None:
        """Run ``then`` once no call is on a worker any more (now if none is)."""
        if self.calls:
            self._returned = then
        else:
            then()

    def oldest_ns(self) -> int | None:
        """How long the longest-running call has run, or None if none runs."""
        for host in self.calls:
            return perf_counter_ns() - host.started
        return None
