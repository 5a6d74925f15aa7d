"""FuseWait, the faster wait for FUSE requests, over a pipe standing in for /dev/fuse, and
its adaptive busy-polling."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from blkfs.frontends.fuse.compat.session_loop import AdaptivePoll, FuseWait


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


async def test_a_queued_request_is_taken_without_a_scheduler_pass(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0])
    os.write(pipe[1], b"x")
    with trio.testing.assert_no_checkpoints():
        assert await wait() is True


async def test_an_idle_wait_ends_when_a_request_arrives(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0])
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _record(wait, results))
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        os.write(pipe[1], b"x")
    assert results == [True]


async def test_close_ends_every_waiter_now_and_later(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0])
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lambda: _record(wait, results))
        await trio.testing.wait_all_tasks_blocked()
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])  # what pyfuse3.terminate() does after
    assert results == [False] * 3
    os.write(pipe[1], b"x")
    assert await wait() is False


async def test_idle_workers_park_and_one_takes_each_request(pipe: tuple[int, int]) -> None:
    """No worker ends while idle: pyfuse3 would start a new task for the next request."""
    wait = FuseWait(pipe[0])
    results: list[bool] = []

    async def take() -> None:  # as pyfuse3 does: wait, then read the request
        while await wait():
            os.read(pipe[0], 1)
            results.append(True)
        results.append(False)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        for taken in range(1, 4):
            os.write(pipe[1], b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert results == [True] * taken
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])
    assert results == [True] * 3 + [False] * 8


async def test_a_cancelled_parked_worker_is_never_woken(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0])
    results: list[str] = []

    async def take(name: str) -> None:
        while await wait():
            os.read(pipe[0], 1)
            results.append(name)
        results.append(f"{name} ended")

    async def cancellable(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await take("cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "watcher")  # waits in epoll
        await trio.testing.wait_all_tasks_blocked()
        scope = await nursery.start(cancellable)
        await trio.testing.wait_all_tasks_blocked()  # parked
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()  # gone: a wake for it would crash trio
        nursery.start_soon(take, "spare")
        await trio.testing.wait_all_tasks_blocked()
        os.write(pipe[1], b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert results == ["watcher"]
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])
    assert sorted(results) == ["spare ended", "watcher", "watcher ended"]


class StepCounter(trio.abc.Instrument):
    """Counts the steps trio runs of each task."""

    def __init__(self) -> None:
        self.steps: dict[trio.lowlevel.Task, int] = {}

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


async def test_a_request_served_at_once_wakes_no_other_worker(pipe: tuple[int, int]) -> None:
    """The taker comes back and watches itself: waking another worker, which would only
    park again, cost a third of a request's instructions."""
    wait = FuseWait(pipe[0])
    results: list[trio.lowlevel.Task] = []

    async def take() -> None:
        while await wait():
            os.read(pipe[0], 1)
            results.append(trio.lowlevel.current_task())

    counter = StepCounter()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(counter)
        for _ in range(5):
            os.write(pipe[1], b"x")
            await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.remove_instrument(counter)
        assert len(results) == 5 and len(set(results)) == 1
        taker = results[0]
        assert {task for task in counter.steps if task.name.endswith("take")} == {taker}
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])


async def test_a_request_that_suspends_has_another_worker_watch(pipe: tuple[int, int]) -> None:
    """Requests whose handlers wait (a read from the disk) are served side by side."""
    wait = FuseWait(pipe[0])
    release = trio.Event()
    inside: list[trio.lowlevel.Task] = []

    async def take() -> None:
        while await wait():
            os.read(pipe[0], 1)
            inside.append(trio.lowlevel.current_task())
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        for taken in range(1, 4):
            os.write(pipe[1], b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert len(inside) == taken  # one more request taken while the others wait
        assert len(set(inside)) == 3
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])


async def _record(wait: FuseWait, results: list[bool]) -> None:
    results.append(await wait())


def _write_later(fd: int, seconds: float) -> threading.Thread:
    """A client on another CPU sending its next request while the daemon waits."""
    timer = threading.Timer(seconds, os.write, (fd, b"x"))
    timer.start()
    return timer


async def test_a_request_that_comes_while_polling_is_taken_without_sleeping(
    pipe: tuple[int, int],
) -> None:
    wait = FuseWait(pipe[0], poll_max_ns=60 * 10**9)
    wait.polling.ns = wait.polling.max_ns  # learnt from requests that came close together
    writer = _write_later(pipe[1], 0.05)
    with trio.testing.assert_no_checkpoints():  # an epoll wait would be a checkpoint
        assert await wait() is True
    writer.join()


@pytest.mark.timeout(20)
async def test_no_polling_while_another_task_could_run(pipe: tuple[int, int]) -> None:
    """The task that will send the request is runnable: polling would spin for an hour
    without ever seeing it."""
    wait = FuseWait(pipe[0], poll_max_ns=3600 * 10**9)
    wait.polling.ns = wait.polling.max_ns

    async def client() -> None:
        os.write(pipe[1], b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        assert await wait() is True


async def test_an_idle_wait_stops_polling(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0], poll_max_ns=10**6)
    wait.polling.ns = wait.polling.max_ns
    writer = _write_later(pipe[1], 0.2)  # 200 times the longest poll
    assert await wait() is True
    writer.join()
    assert wait.polling.ns == 0


def test_a_request_within_the_poll_time_keeps_it() -> None:
    polling = AdaptivePoll(64_000)
    polling.ns = 16_000
    polling.record(10_000)
    assert polling.ns == 16_000


def test_requests_close_together_grow_the_poll_time_to_the_maximum() -> None:
    polling = AdaptivePoll(64_000)
    steps = []
    for _ in range(6):
        polling.record(50_000)
        steps.append(polling.ns)
    assert steps == [4_000, 8_000, 16_000, 32_000, 64_000, 64_000]


@given(max_ns=st.integers(0, 10**9), waits=st.lists(st.integers(0, 2 * 10**9), max_size=50))
def test_the_poll_time_stays_within_its_bounds(max_ns: int, waits: list[int]) -> None:
    polling = AdaptivePoll(max_ns)
    for waited in waits:
        before = polling.ns
        polling.record(waited)
        assert 0 <= polling.ns <= max_ns
        if waited > max_ns:
            assert polling.ns == (before if waited <= before else 0)
    if max_ns == 0:
        assert polling.ns == 0
