"""The io_uring layer (blkfs.block.uring) and the file driver's ``aio=io_uring``."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block.uring import OP_READ, OP_WRITE, Pinned, Ring
from blkfs.block.workers import HostQueue, ring_door
from blkfs.errors import LastingError

BLOCK = 4096
SLOTS = 32


@pytest.fixture(scope="module")
def ring() -> Iterator[Ring]:
    """A ring smaller than a batch, with a completion queue smaller than a batch too: its
    indices wrap and its completions overflow into the kernel's list."""
    made = Ring(entries=4, cq_entries=8)
    try:
        yield made
    finally:
        made.close()


def wait_all(ring: Ring, wanted: set[int]) -> dict[int, int]:
    done: dict[int, int] = {}
    while True:
        for key, result in ring.reap():
            assert key in wanted and key not in done, key
            done[key] = result
        if len(done) == len(wanted):
            return done
        assert select.select([ring.eventfd], [], [], 30)[0], "no completion within 30 s"
        os.eventfd_read(ring.eventfd)


batches = st.lists(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, SLOTS - 1), st.integers(1, BLOCK), st.binary()),
        min_size=1,
        max_size=20,
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(batches=batches)
def test_every_request_completes_once_with_its_data(
    ring: Ring,
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[list[tuple[bool, int, int, bytes]]],
) -> None:
    """Batches of reads and writes on distinct slots (more than the ring holds at once);
    each completion comes once, with its own key, and the file matches a model."""
    path = tmp_path_factory.mktemp("ring") / "file"
    model = bytearray(SLOTS * BLOCK)
    path.write_bytes(model)
    fd = os.open(path, os.O_RDWR)
    try:
        key = 0
        for batch in batches:
            requests: dict[int, tuple[bool, int, bytearray, Pinned]] = {}
            used: set[int] = set()
            for is_write, slot, length, payload in batch:
                if slot in used:
                    continue
                used.add(slot)
                buf = bytearray((payload * length)[:length] if payload else bytes(length))
                pin = Pinned(memoryview(buf), writable=not is_write)
                key += 1
                requests[key] = (is_write, slot, buf, pin)
                opcode = OP_WRITE if is_write else OP_READ
                while not ring.push(opcode, fd, pin.address, length, slot * BLOCK, 0, key):
                    ring.submit()
            ring.submit()
            results = wait_all(ring, set(requests))
            for done_key, (is_write, slot, buf, pin) in requests.items():
                pin.release()
                assert results[done_key] == len(buf)
                start = slot * BLOCK
                if is_write:
                    model[start : start + len(buf)] = buf
                else:
                    assert buf == model[start : start + len(buf)]
        assert path.read_bytes() == model
    finally:
        os.close(fd)


async def test_a_request_let_go_keeps_its_buffer_until_the_kernel_answers() -> None:
    """A read of a pipe nobody writes (a device that does not answer): let_go answers its
    caller with the error at once; the buffer stays pinned (a bytearray cannot be resized)
    until the kernel fills it, and the queue's calls end only then."""
    door = ring_door(2)
    queue = HostQueue(limit=2)
    reader, writer = os.pipe()
    buf = bytearray(5)
    returned = trio.Event()
    errors: list[int] = []

    async def read() -> None:
        try:
            await queue.start(door.read(reader, memoryview(buf), 0))
        except LastingError as exc:
            errors.append(exc.errno)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert queue.oldest_ns() is not None
            assert queue.let_go(lambda: LastingError(errno.EIO, "let go")) == 1
        assert errors == [errno.EIO]
        with pytest.raises(BufferError):
            buf.extend(b"!")  # still the kernel's
        queue.when_returned(returned.set)
        os.write(writer, b"late!")
        await returned.wait()
        assert bytes(buf) == b"late!" and queue.oldest_ns() is None
    finally:
        os.close(reader)
        os.close(writer)


SECCOMP = """
import ctypes, errno, struct, sys, trio
from blkfs.layer import BlockLayer
from blkfs.errors import BlockError

# ENOSYS for io_uring_setup (425), everything else allowed: a seccomp filter of a sandbox
program = b"".join(
    struct.pack("HBBI", *insn)
    for insn in [(0x20, 0, 0, 0), (0x15, 0, 1, 425), (0x06, 0, 0, 0x50000 | errno.ENOSYS),
                 (0x06, 0, 0, 0x7FFF0000)]
)
buf = ctypes.create_string_buffer(program)
fprog = struct.pack("HxxxxxxQ", 4, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER

async def main() -> None:
    layer = BlockLayer()
    try:
        await layer.create("d", f"driver=file,aio=io_uring,filename={sys.argv[1]}")
    except BlockError as exc:
        print(exc.errno, exc.message)
    assert "d" not in layer and not layer.graph.nodes
    for aio in (",aio=threads", ""):  # without aio: threads where io_uring is refused
        backend = await layer.create("d", f"driver=file{aio},filename={sys.argv[1]}")
        await backend.write(0, b"w" * 4096)
        assert await backend.read(0, 8192) == b"w" * 4096 + bytes(4096)
        await backend.flush()
        await layer.delete("d")
    await layer.close()

trio.run(main)
"""


def test_without_io_uring_aio_io_uring_fails_clearly_and_threads_serve(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(65536))
    done = subprocess.run(
        [sys.executable, "-c", SECCOMP, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    code, message = done.stdout.strip().split(" ", 1)
    assert int(code) == errno.EINVAL
    assert "aio=io_uring, but this system refuses io_uring" in message
    assert "use aio=threads" in message
