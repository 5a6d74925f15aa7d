"""FuseWait, the faster wait for FUSE requests, over a pipe standing in for /dev/fuse."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import trio
import trio.testing

from blkfs.fuseloop import SPARE_WORKERS, FuseWait


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


async def test_spare_workers_beyond_the_limit_end(pipe: tuple[int, int]) -> None:
    wait = FuseWait(pipe[0])
    results: list[bool] = []
    async with trio.open_nursery() as nursery:
        for _ in range(SPARE_WORKERS + 3):
            nursery.start_soon(lambda: _record(wait, results))
        await trio.testing.wait_all_tasks_blocked()
        assert results == [False] * 2  # one waits in epoll, SPARE_WORKERS park
        wait.close()
        trio.lowlevel.notify_closing(pipe[0])


async def _record(wait: FuseWait, results: list[bool]) -> None:
    results.append(await wait())
