"""Host calls on worker threads (blkfs.block.workers) and the file driver's ``aio`` option."""

from __future__ import annotations

import errno
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import outcome
import pytest
import trio
import trio.testing

from blkfs.block.workers import HostQueue, completion
from blkfs.errors import BlockError, LastingError
from blkfs.layer import BlockLayer


async def test_one_nodes_stuck_calls_hold_only_its_own_workers() -> None:
    stuck, other = HostQueue(limit=2), HostQueue(limit=2)
    release = threading.Event()
    started: list[int] = []
    two_started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def hang(index: int) -> int:
        started.append(index)
        if len(started) == 2:
            token.run_sync_soon(two_started.set)
        release.wait()
        return index

    results: list[int] = []

    async def call(index: int) -> None:
        results.append(await stuck.run(hang, index))

    async with trio.open_nursery() as nursery:
        for index in range(5):
            nursery.start_soon(call, index)
        try:
            await two_started.wait()
            assert stuck.running == 2 and stuck.oldest_ns() is not None
            assert await other.run(lambda: "answered") == "answered"  # not behind them
            assert len(started) == 2  # the other three wait their turn
        finally:
            release.set()  # else the nursery would wait for them forever
    assert sorted(results) == [0, 1, 2, 3, 4] and stuck.running == 0
    assert stuck.oldest_ns() is None


async def test_a_failed_call_raises_in_the_caller_and_frees_its_turn() -> None:
    queue = HostQueue(limit=1)

    def fail() -> None:
        raise OSError(errno.EIO, "injected")

    with pytest.raises(OSError, match="injected"):
        await queue.run(fail)
    assert queue.running == 0 and await queue.run(lambda: 7) == 7


async def test_calls_after_let_go_each_fail_with_an_exception_of_their_own() -> None:
    """A queue let go answers the call in flight, the one waiting its turn and every later
    call each with a new exception: one instance raised again and again would carry every
    raise's frames in its traceback, and each catcher's changes to it to the next."""
    queue = HostQueue(limit=1)
    release = threading.Event()
    caught: list[BaseException] = []

    async def call() -> None:
        try:
            await queue.run(release.wait)
        except BlockError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        try:  # the device answers only at the end, even if the test fails
            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert queue.let_go(lambda: LastingError(errno.EIO, "let go")) == 2
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                await call()
        finally:
            release.set()
    assert [exc.errno for exc in caught] == [errno.EIO] * 4  # type: ignore[attr-defined]
    assert len({id(exc) for exc in caught}) == 4
    depths = [len(traceback.extract_tb(exc.__traceback__)) for exc in caught[2:]]
    assert depths[0] == depths[1]


async def test_aio_native_is_refused_and_nothing_opens(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(65536))
    layer = BlockLayer()
    with pytest.raises(BlockError) as caught:
        await layer.create("d", f"driver=file,aio=native,filename={path}")
    assert caught.value.errno == errno.EINVAL
    assert "aio=native is not implemented" in caught.value.message
    assert "d" not in layer and not layer.graph.nodes
    backend = await layer.create("d", f"driver=file,aio=threads,filename={path}")
    assert await backend.read(0, 4096) == bytes(4096)
    await layer.close()


async def test_completions_from_a_librarys_own_threads_reach_their_tasks() -> None:
    """blkfs.block.workers.completion: as librbd's callbacks do, other threads finish the
    operations, in any order; each task gets its own outcome, an error is raised in it."""
    gates = [threading.Event() for _ in range(8)]
    results: dict[int, object] = {}

    def start_on_a_thread(index: int) -> Callable[[Callable[[outcome.Outcome[Any]], None]], None]:
        def start(done: Callable[[outcome.Outcome[Any]], None]) -> None:
            def finish() -> None:
                gates[index].wait()
                if index == 5:
                    done(outcome.Error(BlockError(errno.EIO, "the fifth failed")))
                else:
                    done(outcome.Value(index * 10))

            threading.Thread(target=finish, daemon=True).start()

        return start

    async def call(index: int) -> None:
        try:
            results[index] = await completion(start_on_a_thread(index))
        except BlockError as exc:
            results[index] = exc.errno

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(call, index)
        await trio.sleep(0.01)
        for gate in reversed(gates):  # the last started finishes first
            gate.set()
    assert results == {i: (errno.EIO if i == 5 else i * 10) for i in range(8)}


async def test_a_completion_that_cannot_start_raises_at_once() -> None:
    def refuse(done: Callable[[outcome.Outcome[Any]], None]) -> None:
        raise BlockError(errno.EINVAL, "not started")

    with pytest.raises(BlockError, match="not started"):
        await completion(refuse)
