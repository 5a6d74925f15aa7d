"""FuseWait, the faster wait for FUSE requests, over a pipe standing in for /dev/fuse."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from blkfs.frontends.fuse.session_loop import FuseWait


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


async def _record(wait: FuseWait, results: list[bool]) -> None:
    results.append(await wait())
