"""blklogwrites against QEMU's: one workload run by ``qemu-io`` through QEMU's own
blklogwrites and in-process through blkfs's must leave logs with the same entries, and each
log, replayed onto the image as it was before, must rebuild the image as it is after.
Then the driver's own promises, without QEMU: the order of a flush entry, failed flushes,
``log-append``, the super block update interval and the options QEMU refuses."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
import trio

from blkfs.backend import BlockBackend, BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import KiB, MiB, qemu
from tests.conftest import needs_qemu
from tests.logreplay import FLUSH, MARK, Log, LogError, apply_to, crash_state, parse

SIZE = 1 * MiB

Op = tuple[str, int, int, int]
"""(kind, offset, length, pattern byte) with kind write, zero, discard or flush."""

WORKLOAD: list[Op] = [
    ("write", 0, 64 * KiB, 0x11),
    ("write", 1000, 3000, 0x22),  # unaligned: read-modify-written above the filter
    ("zero", 64 * KiB, 8 * KiB, 0),
    ("zero", 70000, 1000, 0),  # partial sectors around a whole one
    ("zero", 90000, 300, 0),  # within one sector
    ("discard", 128 * KiB, 64 * KiB, 0),
    ("flush", 0, 0, 0),
    ("write", 200 * KiB, 128 * KiB, 0x33),
    ("zero", 256 * KiB, 16 * KiB, 0),
    ("flush", 0, 0, 0),
    ("flush", 0, 0, 0),  # nothing since the last: QEMU logs no entry
    ("write", SIZE - 4 * KiB, 4 * KiB, 0x44),
    ("write", 512 * KiB + 7, 1, 0x55),
]


def qemu_io_commands(ops: list[Op]) -> list[str]:
    verbs = {
        "write": "write -P {3} {1} {2}",
        "zero": "write -z {1} {2}",
        "discard": "discard {1} {2}",
        "flush": "flush",
    }
    return [verbs[op[0]].format(*op) for op in ops]


async def run_in_blkfs(options: str, ops: list[Op]) -> None:
    layer = BlockLayer()
    backend = await layer.create("d", options)
    try:
        await run_ops(backend, ops)
    finally:
        await layer.close()


async def run_ops(backend: BlockBackend, ops: list[Op]) -> None:
    for kind, offset, length, byte in ops:
        if kind == "write":
            await backend.write(offset, bytes([byte]) * length)
        elif kind == "zero":
            await backend.write_zeroes(offset, length)
        elif kind == "discard":
            await backend.discard(offset, length)
        else:
            await backend.flush()


def filter_options(image: Path, log: Path, extra: str = "") -> str:
    return (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log}{extra}"
    )


def fresh(tmp: Path, name: str, before: bytes) -> tuple[Path, Path]:
    image, log = tmp / f"{name}.img", tmp / f"{name}.log"
    image.write_bytes(before)
    log.write_bytes(b"")
    return image, log


def replayed(before: bytes, log: Log) -> bytes:
    image = bytearray(before)
    apply_to(image, log, crash_state(log, len(log.entries)))
    return bytes(image)


def summary(log: Log) -> list[tuple[int, int, int, bytes]]:
    """The entries as (sector, nr_sectors, flags, data), for comparing two logs."""
    return [(e.sector, e.nr_sectors, e.flags, bytes(e.data)) for e in log.entries]


@needs_qemu
@pytest.mark.qemu
@pytest.mark.parametrize("sector", [512, 4096])
def test_qemu_and_blkfs_log_a_workload_alike_and_both_logs_replay(
    tmp_path: Path, sector: int
) -> None:
    before = random.Random(5).randbytes(SIZE)
    extra = f",log-sector-size={sector}"
    qimage, qlog = fresh(tmp_path, "qemu", before)
    commands = [arg for command in qemu_io_commands(WORKLOAD) for arg in ("-c", command)]
    # writeback: qemu-io's default writethrough adds flushes of its own (FUA emulation)
    qemu(
        "qemu-io", "-t", "writeback", "--image-opts", filter_options(qimage, qlog, extra), *commands
    )
    bimage, blog = fresh(tmp_path, "blkfs", before)
    trio.run(run_in_blkfs, filter_options(bimage, blog, extra), WORKLOAD)

    qemu_log, blkfs_log = parse(qlog.read_bytes()), parse(blog.read_bytes())
    assert qemu_log.sector_size == blkfs_log.sector_size == sector
    assert replayed(before, qemu_log) == qimage.read_bytes()
    assert replayed(before, blkfs_log) == bimage.read_bytes()
    assert bimage.read_bytes() == qimage.read_bytes()
    assert summary(blkfs_log) == summary(qemu_log)
    flushes = [i for i, e in enumerate(blkfs_log.entries) if e.flags & FLUSH]
    assert len(flushes) == 3 and flushes[-1] == len(blkfs_log.entries) - 1  # two + close


@needs_qemu
@pytest.mark.qemu
def test_qemu_appends_to_a_log_blkfs_wrote_and_blkfs_to_one_qemu_wrote(tmp_path: Path) -> None:
    before = random.Random(6).randbytes(SIZE)
    image, log = fresh(tmp_path, "mixed", before)
    first, second = WORKLOAD[:7], WORKLOAD[7:]
    trio.run(run_in_blkfs, filter_options(image, log), first)
    qemu(
        "qemu-io",
        "-t",
        "writeback",
        "--image-opts",
        filter_options(image, log, ",log-append=on"),
        *[arg for command in qemu_io_commands(second) for arg in ("-c", command)],
    )
    trio.run(run_in_blkfs, filter_options(image, log, ",log-append=on"), first)
    assert replayed(before, parse(log.read_bytes())) == image.read_bytes()


# -- the driver's own promises ----------------------------------------------------------


def test_replay_rebuilds_random_unaligned_io(tmp_path: Path) -> None:
    rng = random.Random(7)
    ops: list[Op] = []
    for _ in range(200):
        kind = rng.choice(("write", "write", "zero", "discard", "flush"))
        offset = rng.randrange(SIZE)
        ops.append((kind, offset, rng.randint(1, min(70000, SIZE - offset)), rng.randrange(1, 256)))
    before = rng.randbytes(SIZE)
    for sector in (512, 4096):
        image, log = fresh(tmp_path, f"s{sector}", before)
        trio.run(run_in_blkfs, filter_options(image, log, f",log-sector-size={sector}"), ops)
        assert replayed(before, parse(log.read_bytes())) == image.read_bytes()


def test_a_flush_entry_covers_only_what_completed_before_the_flush_was_sent(tmp_path: Path) -> None:
    """A write done while the flush below is still running may have missed it: it is
    logged after the flush entry."""
    image, log = fresh(tmp_path, "d", bytes(SIZE))
    options = (
        f"driver=blklogwrites,file.driver=blkdebug,file.delay.flush=100ms,"
        f"file.image.driver=file,file.image.filename={image},"
        f"log.driver=file,log.filename={log}"
    )

    async def main() -> None:
        layer = BlockLayer()
        backend = await layer.create("d", options)
        try:
            await backend.write(0, b"\1" * 4096)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.flush)
                await trio.sleep(0.02)
                await backend.write(4096, b"\2" * 4096)
        finally:
            await layer.close()

    trio.run(main)
    entries = parse(log.read_bytes()).entries
    assert [(e.sector, e.flags) for e in entries] == [(0, 0), (0, FLUSH), (8, 0), (0, FLUSH)]


def test_a_failed_flush_is_no_flush_entry(tmp_path: Path) -> None:
    """It leaves a mark where its entry would have been; a later flush that succeeds (if the
    layer lets one through after a failure) is logged as usual."""
    image, log = fresh(tmp_path, "d", bytes(SIZE))
    options = (
        f"driver=blklogwrites,file.driver=blkdebug,file.inject-error.0.event=flush,"
        f"file.inject-error.0.once=on,file.image.driver=file,"
        f"file.image.filename={image},log.driver=file,log.filename={log}"
    )

    async def main() -> None:
        layer = BlockLayer()
        backend = await layer.create("d", options)
        try:
            await backend.write(0, b"\1" * 512)
            with pytest.raises(BlockError) as failed:
                await backend.flush()
            assert failed.value.errno == errno.EIO
        finally:
            await layer.close()

    trio.run(main)
    entries = parse(log.read_bytes()).entries
    assert [(e.flags, e.mark) for e in entries[:2]] == [(0, b""), (MARK, b"flush failed")]
    assert [e.flags for e in entries[2:]] in ([], [FLUSH])  # the close's flush


def test_the_super_block_counts_entries_every_interval_and_at_close(tmp_path: Path) -> None:
    image, log = fresh(tmp_path, "d", bytes(SIZE))

    async def main() -> None:
        layer = BlockLayer()
        backend = await layer.create(
            "d", filter_options(image, log, ",log-super-update-interval=2")
        )
        try:
            await backend.write(0, b"\1" * 512)
            with pytest.raises(LogError, match="bad magic 0x0"):  # no super block yet
                parse(log.read_bytes())
            for n in range(1, 5):
                await backend.write(n * 512, b"\1" * 512)
                assert len(parse(log.read_bytes()).entries) == (n + 1) // 2 * 2
        finally:
            await layer.close()

    trio.run(main)
    assert len(parse(log.read_bytes()).entries) == 6  # and the flush of the close


def test_log_append_continues_the_log_with_its_sector_size(tmp_path: Path) -> None:
    before = bytes(SIZE)
    image, log = fresh(tmp_path, "d", before)
    trio.run(run_in_blkfs, filter_options(image, log, ",log-sector-size=4096"), WORKLOAD[:3])
    trio.run(run_in_blkfs, filter_options(image, log, ",log-append=on"), WORKLOAD[3:])
    parsed = parse(log.read_bytes())
    assert parsed.sector_size == 4096
    assert replayed(before, parsed) == image.read_bytes()
    # without log-append a new log starts over the old one
    trio.run(run_in_blkfs, filter_options(image, log), WORKLOAD[:1])
    assert len(parse(log.read_bytes()).entries) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (",log-sector-size=1000", "invalid log sector size 1000"),
        (",log-sector-size=16", "invalid log sector size 16"),
        (",log-append=on,log-sector-size=512", "mutually exclusive"),
        (",log-super-update-interval=0", "at least 1"),
        (",log-sektor-size=512", "unknown option 'log-sektor-size'"),
    ],
)
def test_options_qemu_refuses_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    image, log = fresh(tmp_path, "d", bytes(SIZE))
    with pytest.raises(BlockError, match=message) as refused:
        trio.run(run_in_blkfs, filter_options(image, log, extra), [])
    assert refused.value.errno == errno.EINVAL
    assert log.read_bytes() == b""


def test_log_append_refuses_what_is_not_a_log(tmp_path: Path) -> None:
    image, log = fresh(tmp_path, "d", bytes(SIZE))
    log.write_bytes(b"not a log" * 100)
    with pytest.raises(BlockError, match="magic"):
        trio.run(run_in_blkfs, filter_options(image, log, ",log-append=on"), [])
