"""Durability by crash-point replay, as the Linux filesystem people prove theirs with
dm-log-writes (xfstests' replay-log, CrashMonkey): a power cut, not a process kill.

A seeded workload (writes of 512 B to 256 KiB, most into new clusters, overwrites, zero
writes, discards, fsyncs; an image made smaller than the workload grows half-way) runs
in-process through ``FORMAT -> blklogwrites -> file``, so the
log holds every write the format driver made to its image file, metadata included, and every
barrier it asked for. After each fsync returns, the log's length is noted. Then the image is
rebuilt, from a copy taken before the workload, at every flush point of the log and in
several states a power cut could leave after it (any subset of the writes logged between that
flush and the next, see :mod:`tests.logreplay`), and each state must pass:

* ``qemu-img check`` (exit 0, or 3: leaked clusters are allowed), and
* every guest byte acknowledged by the last fsync that the state contains reads back (through
  ``qemu-img convert``). An fsync is contained once its last flush entry is (after that it
  may only discard freed clusters, which is checked too); bytes that an operation after it,
  begun before the next flush entry was logged, may have touched are not checked.

The ``qcow2-reuse`` workload discards what it wrote and writes again into the same quarter
of the disk, so the clusters the discards free are reused after each fsync; its image must
stay within that quarter and its metadata.

A failure names the crash point, the writes kept, qemu-img's message and, for qcow2, which
metadata points past the end of the file the crash left.

``BLKFS_STRESS_SEED`` chooses another workload; ``BLKFS_STRESS_SECONDS`` gives the replay
phase of each format more time, hence more states per flush point.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from blkfs_drivers.blklogwrites import BlklogwritesDriver

from blkfs.backend import BlockBackend
from blkfs.layer import BlockLayer
from tests.compat.peers import KiB, MiB, qemu, qemu_io, to_raw
from tests.conftest import needs_qemu
from tests.logreplay import Entry, Log, apply_to, apply_to_file, crash_state, parse, undo

pytestmark = [needs_qemu, pytest.mark.qemu, pytest.mark.stress]

SIZE = 16 * MiB
OPERATIONS = 260
DEFAULT_SEED = 20240601
MAX_FAILURES = 12
"""Failed states reported per format before the replay gives up."""


# -- images -----------------------------------------------------------------------------


def plain_qcow2(d: Path, options: str = "", size: int = SIZE) -> tuple[Path, bytes]:
    image = d / "disk.qcow2"
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        *(["-o", options] if options else []),
        image,
        str(size),
    )
    return image, bytes(SIZE)


def qcow2_over_backing(d: Path) -> tuple[Path, bytes]:
    """A 4 KiB-cluster overlay (an L2 table maps 2 MiB, a refcount block 8 MiB: metadata
    grows as the workload goes) over a qcow2 base with data; named by absolute path, since a
    relative one would resolve against the blklogwrites node, which has no file name."""
    base = d / "base.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "qcow2", "write -P 0x5a 0 5M", "write -P 0xa5 8M 3M", "write -P 0x33 14M 64k")
    image = d / "disk.qcow2"
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        base,
        "-F",
        "qcow2",
        image,
    )
    return image, to_raw(image)


def raw(d: Path) -> tuple[Path, bytes]:
    image = d / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    return image, bytes(SIZE)


VARIANTS: dict[str, tuple[Callable[[Path], tuple[Path, bytes]], str, float]] = {
    "qcow2": (plain_qcow2, "qcow2", 25.0),
    "qcow2-reuse": (lambda d: plain_qcow2(d, "cluster_size=4k"), "qcow2", 25.0),
    "qcow2-c512": (lambda d: plain_qcow2(d, "cluster_size=512"), "qcow2", 25.0),
    "qcow2-backing": (qcow2_over_backing, "qcow2", 25.0),
    "qcow2-grows": (lambda d: plain_qcow2(d, "cluster_size=512", SIZE // 2), "qcow2", 25.0),
    "raw": (raw, "raw", 8.0),
}
"""Image maker, format, CI seconds for the replay phase. 512-byte clusters make metadata
dense (an L2 table maps 32 KiB, a refcount block 128 KiB, a refcount table cluster 8 MiB),
so new L2 tables, refcount blocks and a moved refcount table come with most writes. An image
made smaller than ``SIZE`` is grown to it half-way through the workload (its L1 table moves:
one L1 cluster maps 2 MiB). ``qcow2-reuse`` runs :func:`_reuse_op`'s workload."""


def tree(fmt: str, image: Path, log: Path) -> str:
    return (
        f"driver={fmt},file.driver=blklogwrites,file.node-name=logwrites,"
        f"file.file.driver=file,file.file.filename={image},"
        f"file.log.driver=file,file.log.filename={log}"
    )


# -- the workload -----------------------------------------------------------------------


@dataclass
class Op:
    """One guest operation, and where the log stood around it."""

    kind: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    """What the guest reads in the range afterwards."""
    start: int = 0
    """Log entries before the operation began: none of its writes can come earlier."""
    end: int = 0
    """Log entries when it returned."""
    durable: int = 0
    """For an fsync: log entries up to its last flush, which make it durable."""


@dataclass
class Workload:
    ops: list[Op] = field(default_factory=list)
    model: bytearray = field(default_factory=bytearray)


def _length(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice((512, 4 * KiB, 64 * KiB, 256 * KiB))
    if pick < 0.6:
        return rng.randrange(512, 256 * KiB + 1, 512)
    return rng.randint(512, 256 * KiB)


def _offset(rng: random.Random, length: int, size: int) -> int:
    offset = rng.randrange(0, size - length + 1)
    align = rng.choice((4096, 4096, 512, 1))
    return offset - offset % align


async def run_workload(options: str, initial: bytes, seed: int, reuse: bool = False) -> Workload:
    """Run the seeded operations through a backend over ``options`` (those of
    :func:`_reuse_op` with ``reuse``); the model is what the guest reads at the end."""
    next_op = _reuse_op if reuse else _next_op
    rng = random.Random(seed)
    work = Workload(model=bytearray(initial))
    written: list[tuple[int, int]] = []
    layer = BlockLayer()
    backend = await layer.create("disk", options)
    logger = layer.graph.find("logwrites").driver
    assert isinstance(logger, BlklogwritesDriver)
    size = backend.length()
    try:
        for number in range(OPERATIONS):
            if size < SIZE and number == OPERATIONS // 2:
                op = Op("truncate", start=logger.entries)
                await backend.truncate(SIZE)
                size = SIZE
                op.end = logger.entries
                work.ops.append(op)
            start = logger.entries
            if rng.random() < 0.1:  # the reuse workload writes within a quarter of the disk
                batch = _together(rng, size // 4 if reuse else size)
                async with trio.open_nursery() as nursery:
                    for op in batch:
                        nursery.start_soon(backend.write, op.offset, op.data)
            else:
                batch = [next_op(rng, written, size)]
                await _do(backend, batch[0], rng)
            for op in batch:
                op.start, op.end = start, logger.entries
                work.ops.append(op)
                if op.kind in ("write", "zero", "discard"):
                    work.model[op.offset : op.offset + op.length] = op.data
                    if op.kind == "write":
                        written.append((op.offset, op.length))
        final = Op("fsync", start=logger.entries)
        await backend.flush()
        final.end = logger.entries
        work.ops.append(final)
        assert await backend.read(0, SIZE) == work.model, "blkfs reads back other data"
    finally:
        await layer.close()
    return work


def _next_op(rng: random.Random, written: list[tuple[int, int]], size: int) -> Op:
    pick = rng.random()
    if pick < 0.12:
        return Op("fsync")
    if pick < 0.27 and written:  # overwrite part of an earlier write
        offset, length = rng.choice(written)
        start = offset + rng.randrange(length)
        return Op("write", start, rng.randint(1, offset + length - start))
    if pick < 0.37:
        length = _length(rng)
        return Op("zero", _offset(rng, length, size), length)
    if pick < 0.44:
        length = rng.choice((4 * KiB, 64 * KiB, 128 * KiB, rng.randint(512, 256 * KiB)))
        return Op("discard", _offset(rng, length, size), length)
    length = _length(rng)
    return Op("write", _offset(rng, length, size), length)


def _together(rng: random.Random, size: int) -> list[Op]:
    """Two to four writes in flight at once, over other bytes of the same or other
    clusters (qcow2 allocations in flight: drivers/qcow2/allocations.py); their data is
    drawn here, so the seed alone decides it, whatever order they run in."""
    ops: list[Op] = []
    count = rng.randint(2, 4)
    while len(ops) < count:
        length = _length(rng)
        offset = _offset(rng, length, size)
        if all(offset + length <= o.offset or o.offset + o.length <= offset for o in ops):
            ops.append(Op("write", offset, length, rng.randbytes(length)))
    return ops


def _reuse_op(rng: random.Random, written: list[tuple[int, int]], size: int) -> Op:
    """Discards of what was written, in whole 4 KiB clusters, and writes into the same
    quarter of the disk: each fsync hands the clusters discards freed back to the
    allocator, and the next writes take them, so metadata and data land in clusters that
    held other things a moment (and a flush) before."""
    pick = rng.random()
    if pick < 0.15:
        return Op("fsync")
    if pick < 0.4 and written:
        offset, length = rng.choice(written)
        start = offset - offset % (4 * KiB)
        return Op("discard", start, min(size - start, offset + length - start + 4 * KiB))
    length = _length(rng)
    return Op("write", _offset(rng, length, size // 4), length)


async def _do(backend: BlockBackend, op: Op, rng: random.Random) -> None:
    if op.kind == "write":
        op.data = rng.randbytes(op.length)
        await backend.write(op.offset, op.data)
    elif op.kind == "zero":
        op.data = bytes(op.length)
        await backend.write_zeroes(op.offset, op.length, unmap=rng.random() < 0.5)
    elif op.kind == "discard":
        await backend.discard(op.offset, op.length)
        op.data = bytes(await backend.read(op.offset, op.length))  # old data or zeros
    else:
        await backend.flush()


# -- the replay -------------------------------------------------------------------------


@dataclass
class Failure:
    point: int
    flush_entry: int
    during: str
    subset: str
    problem: str

    def __str__(self) -> str:
        where = (
            f"after flush entry {self.flush_entry}"
            if self.flush_entry >= 0
            else "before the first flush"
        )
        return (
            f"crash point {self.point} ({where}, during {self.during}), "
            f"{self.subset}:\n    {self.problem}"
        )


class Replayer:
    """Takes one image file through the crash states of a log, point by point, and checks
    each; ``model`` follows the last fsync that the current point makes durable."""

    def __init__(
        self, fmt: str, image: Path, log: Log, work: Workload, initial: bytes, seed: int
    ) -> None:
        self.fmt, self.image, self.log, self.work = fmt, image, log, work
        self.seed = seed
        self.model = bytearray(initial)
        self.applied_ops = 0
        """Operations (before the durable fsync) that ``model`` holds."""
        self.fd = os.open(image, os.O_RDWR)
        self.scratch = Path(tempfile.mkdtemp(dir=image.parent))
        self.failures: list[Failure] = []
        self.states = 0
        self.bytes_verified = 0

    def close(self) -> None:
        os.close(self.fd)
        shutil.rmtree(self.scratch)

    def run(self, seconds: float) -> int:
        """Check every crash point, with as many extra subsets as ``seconds`` allows;
        return the number of points."""
        entries = self.log.entries
        points = [-1, *self.log.flush_points()]  # -1: before the first flush
        deadline = time.monotonic() + seconds
        started = time.monotonic()
        for number, flush in enumerate(points):
            following = points[number + 1] if number + 1 < len(points) else len(entries)
            pending = [i for i in range(flush + 1, following) if entries[i].changes_data]
            self._advance_model(flush + 1)
            touched = self._touched(following)
            on_disk = sum(1 for e in entries[: flush + 1] if e.changes_data)
            per_state = (time.monotonic() - started) / self.states if self.states else 0.1
            left = len(points) - number
            extra = int((deadline - time.monotonic()) / (left * per_state + 1e-9)) - 1
            rng = random.Random(f"{self.seed}:{number}")
            for keep, what in self._subsets(rng, pending, min(max(extra, 1), 100)):
                state = crash_state(self.log, following, keep)[on_disk:]
                problem = self._check(state, touched)
                if problem:
                    self.failures.append(
                        Failure(
                            number,
                            flush,
                            self._during(flush + 1, following),
                            f"{what} (kept: {self._describe(keep)})",
                            problem,
                        )
                    )
                    if len(self.failures) >= MAX_FAILURES:
                        return number + 1
            apply_to_file(
                self.fd, self.log, [e for e in entries[flush + 1 : following + 1] if e.changes_data]
            )
        return len(points)

    @staticmethod
    def _subsets(rng: random.Random, pending: list[int], count: int) -> list[tuple[set[int], str]]:
        """The flushed state alone, then states a power cut may leave: a random subset, the
        first k writes (a disk that writes in order), all but one, only one."""
        states: list[tuple[set[int], str]] = [(set(), "no write after it")]
        seen = {frozenset(), frozenset(pending)}  # all of them: the next point's state
        for number in range(count if pending else 0):
            kind = number % 4
            if kind == 0:
                p = rng.uniform(0.1, 0.9)
                keep = {i for i in pending if rng.random() < p}
                states.append((keep, f"a random subset of the {len(pending)} writes after it"))
            elif kind == 1:
                k = rng.randrange(1, len(pending) + 1)
                states.append((set(pending[:k]), f"the first {k} of {len(pending)} writes"))
            elif kind == 2:
                lost = rng.choice(pending)
                states.append((set(pending) - {lost}, f"all {len(pending)} writes but #{lost}"))
            else:
                kept = rng.choice(pending)
                states.append(({kept}, f"only write #{kept} of {len(pending)}"))
            if frozenset(states[-1][0]) in seen:
                states.pop()
            else:
                seen.add(frozenset(states[-1][0]))
        return states

    def _advance_model(self, durable_entries: int) -> None:
        """Apply to the model every operation up to the last fsync that returned with at
        most ``durable_entries`` entries logged (all of them surely on the disk)."""
        ops = self.work.ops
        last = max(
            (i for i, op in enumerate(ops) if op.kind == "fsync" and op.durable <= durable_entries),
            default=-1,
        )
        for op in ops[self.applied_ops : last + 1]:
            if op.kind != "fsync":
                self.model[op.offset : op.offset + op.length] = op.data
        self.applied_ops = max(self.applied_ops, last + 1)

    def _touched(self, entries: int) -> list[tuple[int, int]]:
        """Guest ranges that operations after the durable fsync and begun before entry
        ``entries`` was logged may have changed, merged and sorted."""
        spans = sorted(
            (op.offset, op.offset + op.length)
            for op in self.work.ops[self.applied_ops :]
            if op.start < entries and op.length
        )
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def _check(self, state: list[Entry], touched: list[tuple[int, int]]) -> str:
        """Put the image in the crash state for as long as it takes to check it."""
        done = apply_to_file(self.fd, self.log, state)
        try:
            return self._problem(touched)
        finally:
            undo(self.fd, done)
            self.states += 1

    def _during(self, first: int, last: int) -> str:
        """The operations that logged entries ``first`` to ``last``."""

        def which(entry: int) -> str:
            for index, op in enumerate(self.work.ops):
                if op.start <= entry < op.end:
                    return f"operation {index} ({op.kind})"
            return "the close"

        start, end = which(first), which(last)
        return start if start == end else f"{start} to {end}"

    def _describe(self, keep: set[int]) -> str:
        """Kept writes as #entry host-offset+length, the first few of them."""
        shown = []
        for index in sorted(keep)[:6]:
            offset, length = self.log.extent(self.log.entries[index])
            shown.append(f"#{index} {offset:#x}+{length:#x}")
        more = f" and {len(keep) - 6} more" if len(keep) > 6 else ""
        return ", ".join(shown) + more if shown else "none"

    def _problem(self, touched: list[tuple[int, int]]) -> str:
        check = convert = None
        out = self.scratch / "guest.raw"
        if self.fmt == "qcow2":
            check = subprocess.Popen(
                ["qemu-img", "check", "-f", "qcow2", str(self.image)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            convert = subprocess.Popen(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(self.image), str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        problems = []
        if check is not None:
            text, _ = check.communicate(timeout=120)
            if check.returncode not in (0, 3):
                errors = [
                    line for line in text.splitlines() if "ERROR" in line or "error" in line.lower()
                ][:6] or text.splitlines()[:6]
                problems.append(
                    f"qemu-img check exit {check.returncode}: "
                    + "\n      ".join(errors + dangling(self.fd))
                )
        if convert is not None:
            text, _ = convert.communicate(timeout=120)
            if convert.returncode:
                problems.append(f"qemu-img convert failed: {text.strip()}")
                return "\n    ".join(problems)
            guest = out.read_bytes()
        else:
            guest = os.pread(self.fd, SIZE, 0)
        guest = guest.ljust(SIZE, b"\0")
        lost = self._lost(guest, touched)
        if lost:
            problems.append(lost)
        return "\n    ".join(problems)

    def _lost(self, guest: bytes, touched: list[tuple[int, int]]) -> str:
        """Where fsynced bytes differ, outside the ranges later operations touched."""
        model = self.model
        position = 0
        for start, end in [*touched, (SIZE, SIZE)]:
            if position < start:
                if guest[position:start] != model[position:start]:
                    bad = next(i for i in range(position, start) if guest[i] != model[i])
                    return (
                        f"fsynced byte at guest offset {bad:#x} reads {guest[bad]:#04x}, "
                        f"not {model[bad]:#04x} (last written by "
                        f"{self._last_writer(bad)})"
                    )
                self.bytes_verified += start - position
            position = max(position, end)
        return ""

    def _last_writer(self, offset: int) -> str:
        for index in range(self.applied_ops - 1, -1, -1):
            op = self.work.ops[index]
            if op.kind != "fsync" and op.offset <= offset < op.offset + op.length:
                return f"operation {index}: {op.kind} {op.offset:#x}+{op.length:#x}"
        return "the image as it was made"


def dangling(fd: int) -> list[str]:
    """What the qcow2 metadata of a crashed image points to past the end of its file: the
    usual reason for qemu-img check's "exceeding the end of the file" (reference: qcow2
    spec, header fields; QEMU's check_refcounts_l1)."""
    try:
        return _dangling(fd)
    except (struct.error, ValueError, OverflowError, MemoryError) as exc:
        return [f"(its metadata cannot be followed: {exc})"]


def _dangling(fd: int) -> list[str]:
    size = os.fstat(fd).st_size
    header = os.pread(fd, 72, 0)
    (cluster_bits,) = struct.unpack_from(">I", header, 20)
    l1_size, l1_offset, reftable_offset = struct.unpack_from(">IQQ", header, 36)
    (reftable_clusters,) = struct.unpack_from(">I", header, 56)
    cluster = 1 << cluster_bits
    mask = 0x00FFFFFFFFFFFE00
    found = []
    for index, entry in enumerate(
        struct.unpack(
            f">{reftable_clusters * cluster // 8}Q",
            os.pread(fd, reftable_clusters * cluster, reftable_offset).ljust(
                reftable_clusters * cluster, b"\0"
            ),
        )
    ):
        if entry & mask and (entry & mask) >= size:
            found.append(
                f"refcount table entry {index} -> refcount block at "
                f"{entry & mask:#x}, past the end of the file ({size:#x})"
            )
    l1 = struct.unpack(
        f">{l1_size}Q", os.pread(fd, l1_size * 8, l1_offset).ljust(l1_size * 8, b"\0")
    )
    for index, entry in enumerate(l1):
        l2 = entry & mask
        if l2 and l2 >= size:
            found.append(
                f"L1 entry {index} -> L2 table at {l2:#x}, past the end of the file ({size:#x})"
            )
        elif l2:
            for slot, data in enumerate(
                struct.unpack(f">{cluster // 8}Q", os.pread(fd, cluster, l2).ljust(cluster, b"\0"))
            ):
                if not data >> 62 & 1 and data & mask and (data & mask) >= size:
                    found.append(
                        f"L2 table at {l2:#x} entry {slot} -> data cluster at "
                        f"{data & mask:#x}, past the end of the file ({size:#x})"
                    )
    return found[:4] + ([f"... and {len(found) - 4} more"] if len(found) > 4 else [])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_crash_point_keeps_what_was_fsynced(
    variant: str, images: Path, stress_seconds: Callable[[float], float], figures: dict[str, Any]
) -> None:
    make, fmt, default_seconds = VARIANTS[variant]
    seed = int(os.environ.get("BLKFS_STRESS_SEED", DEFAULT_SEED))
    image, initial = make(images)
    before = images / "before"
    shutil.copyfile(image, before)
    log_path = images / "writes.log"
    log_path.write_bytes(b"")
    started = time.monotonic()
    work = trio.run(
        run_workload, tree(fmt, image, log_path), initial, seed, variant == "qcow2-reuse"
    )
    image_size = image.stat().st_size
    if variant == "qcow2-reuse":  # written all over one quarter of the disk, many times
        assert image_size <= SIZE // 4 + 2 * MiB, (
            f"freed clusters were not reused: the image grew to {image_size} bytes"
        )
    log = parse(log_path.read_bytes())
    entries = log.entries
    fsyncs = [op for op in work.ops if op.kind == "fsync"]
    where = f"({variant}, BLKFS_STRESS_SEED={seed})"

    # the log is whole: replayed onto the image as it was, it gives the image as it is
    rebuilt = bytearray(before.read_bytes())
    apply_to(rebuilt, log, crash_state(log, len(entries)))
    after = image.read_bytes()
    assert bytes(rebuilt).ljust(len(after), b"\0") == after.ljust(len(rebuilt), b"\0"), (
        f"replaying the log does not rebuild the image {where}"
    )
    # every fsync is durable at its last flush; after it, it may only discard (punch holes
    # into freed clusters), never write what a crash could then lose
    for op in fsyncs:
        flushes = [i for i in range(op.end) if entries[i].is_flush]
        op.durable = flushes[-1] + 1 if flushes else 0
        late = [i for i in range(op.durable, op.end) if not entries[i].is_discard]
        assert not late, (
            f"an fsync returned with entries {late} written after its last flush {where}"
        )

    replayer = Replayer(fmt, before, log, work, initial, seed)
    try:
        points = replayer.run(stress_seconds(default_seconds))
    finally:
        replayer.close()
    figures.update(
        {
            f"{variant}_seed": seed,
            f"{variant}_image_bytes": image_size,
            f"{variant}_operations": len(work.ops),
            f"{variant}_fsyncs": len(fsyncs),
            f"{variant}_log_entries": len(entries),
            f"{variant}_flush_entries": len(log.flush_points()),
            f"{variant}_crash_points": points,
            f"{variant}_images_checked": replayer.states,
            f"{variant}_mib_verified": replayer.bytes_verified // MiB,
            f"{variant}_failed_states": len(replayer.failures),
            f"{variant}_seconds": round(time.monotonic() - started, 1),
        }
    )
    shown = "\n  ".join(str(f) for f in replayer.failures[:5])
    assert not replayer.failures, (
        f"{len(replayer.failures)} crash state(s) failed {where}; the first:\n  {shown}"
    )
