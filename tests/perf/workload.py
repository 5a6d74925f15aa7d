"""The fixed operations whose instruction counts guard the request path (run under callgrind
by :mod:`tests.perf.callgrind`; on its own it only runs them).

Each operation runs ``WARMUP`` times (the interpreter specialises its bytecode, qcow2 loads
its L2 tables), then ``count`` times between two calls of the marker ``os.getppid``, which
callgrind is told to dump its counters before: the dump between two markers holds exactly
the instructions of those ``count`` operations, interpreter start-up and image set-up
excluded. Everything is deterministic: fixed offsets from a seeded generator, one task, no
worker threads (media are read-only where a flush would reach a thread), the images held in
the page cache (:func:`pin`), and the hash seed fixed by the caller.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from blkfs.backend import BlockBackend
from blkfs.commands import Commands
from blkfs.frontends.ctl import ControlFiles
from blkfs.frontends.fuse.operations import BlkfsOperations
from blkfs.image import create_image
from blkfs.layer import BlockLayer

MiB = 1 << 20
SIZE = 32 * MiB
CLUSTER = 64 << 10
WARMUP = 40
MARKER = os.getppid
"""Called only between operations: callgrind's ``--dump-before`` names it."""


@dataclass(frozen=True)
class Operation:
    name: str
    count: int
    """How many times it runs between the markers: enough that a per-operation figure does
    not depend on where a garbage collection falls."""
    description: str


OPERATIONS = [
    Operation("read4k-raw", 400, "4 KiB read at random aligned offsets, raw over file"),
    Operation(
        "read4k-qcow2",
        400,
        "4 KiB read at random aligned offsets, qcow2 (all clusters allocated, L2 tables cached)",
    ),
    Operation(
        "read4k-chain",
        400,
        "4 KiB read at random aligned offsets through a 3-deep "
        "qcow2 chain (data in the base, a few clusters above), "
        "every cluster read once before",
    ),
    Operation("read1m-qcow2", 100, "1 MiB read at random 1 MiB-aligned offsets, qcow2"),
    Operation(
        "write4k-alloc-qcow2",
        200,
        "4 KiB write into a new cluster of an empty qcow2 (allocation, copy-on-write of the rest)",
    ),
    Operation(
        "write4k-qcow2",
        400,
        "4 KiB write at random aligned offsets into allocated "
        "clusters of a qcow2 (in place, L2 tables cached)",
    ),
    Operation(
        "discard64k-qcow2",
        200,
        "64 KiB discard of an allocated cluster of a qcow2 "
        "(L2 entry and refcount updated, write-back cached)",
    ),
    Operation(
        "fuse-read4k-qcow2",
        400,
        "4 KiB read through the FUSE read handler (what pyfuse3 calls per request), qcow2",
    ),
    Operation(
        "media-change",
        20,
        "change of a backend's medium between two read-only "
        "qcow2 images (open, permissions, swap, close)",
    ),
]


def pattern(size: int) -> bytes:
    """Data that is not zeros (what is read changes nothing measured)."""
    return bytes(range(1, 256)) * (size // 255) + bytes(range(1, 1 + size % 255))


async def fill(backend: BlockBackend, data: bytes, chunk: int = MiB) -> None:
    for offset in range(0, len(data), chunk):
        await backend.write(offset, data[offset : offset + chunk])
    await backend.flush()


async def make_images(d: Path, layer: BlockLayer) -> None:
    data = pattern(SIZE)
    (d / "disk.raw").write_bytes(data)
    for name in ("disk.qcow2", "base.qcow2", "alt.qcow2", "trim.qcow2"):
        await create_image(str(d / name), "qcow2", SIZE)
        backend = await layer.create(
            "fill", f"driver=qcow2,file.driver=file,file.filename={d / name}"
        )
        await fill(backend, data)
        await layer.delete("fill")
    await create_image(str(d / "mid.qcow2"), "qcow2", backing="base.qcow2", backing_format="qcow2")
    await create_image(str(d / "top.qcow2"), "qcow2", backing="mid.qcow2", backing_format="qcow2")
    for name, first in (("mid.qcow2", 1), ("top.qcow2", 2)):  # a few clusters in each
        backend = await layer.create(
            "fill", f"driver=qcow2,file.driver=file,file.filename={d / name}"
        )
        for cluster in range(first, SIZE // CLUSTER, 37):
            await backend.write(cluster * CLUSTER, bytes([first]) * CLUSTER)
        await backend.flush()
        await layer.delete("fill")


async def prepare(d: Path) -> None:
    layer = BlockLayer()
    await make_images(d, layer)
    await layer.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def pin(image: Path) -> None:
    """Hold ``image`` in the page cache until the process ends: a read that found a page
    evicted (by another process's ``drop_caches``, say) would take the worker path and cost
    three times the instructions. Mapped and locked in memory where the process may (root);
    only read where not."""
    with image.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if not size or address in (None, ctypes.c_void_p(-1).value) or _libc.mlock(address, size):
            f.read()


async def run(d: Path, only: list[str]) -> None:
    layer = BlockLayer()
    (d / "empty.qcow2").unlink(missing_ok=True)  # every run allocates into a new one
    await create_image(str(d / "empty.qcow2"), "qcow2", SIZE)
    for image in d.iterdir():  # no read may wait for the disk
        pin(image)
    rng = random.Random(18)

    def offsets(n: int, unit: int) -> list[int]:
        return [rng.randrange(SIZE // unit) * unit for _ in range(n)]

    def reads(backend: BlockBackend, length: int) -> Callable[[int], Awaitable[None]]:
        buf = memoryview(bytearray(length))
        todo = offsets(WARMUP + 1000, length)

        async def read(i: int) -> None:
            await backend.readinto(todo[i], buf)

        return read

    raw = await layer.create("raw", f"driver=raw,file.driver=file,file.filename={d}/disk.raw")
    # the written images' file nodes use threads: an io_uring write's count depends on whether
    # the kernel has posted its completion when the submit returns, which varies run to run
    qcow2 = await layer.create(
        "qcow2", f"driver=qcow2,file.driver=file,file.filename={d}/disk.qcow2,file.aio=threads"
    )
    chain = await layer.create("chain", f"{d}/top.qcow2")
    empty = await layer.create(
        "empty", f"driver=qcow2,file.driver=file,file.filename={d}/empty.qcow2,file.aio=threads"
    )
    swapped = await layer.create("swapped", f"{d}/base.qcow2,read-only=on")
    trim = await layer.create("trim", f"{d}/trim.qcow2")
    ops = BlkfsOperations(layer, ControlFiles(Commands(layer)))
    inode = (await ops.lookup(pyfuse3.ROOT_INODE, b"qcow2")).st_ino
    fh = (await ops.open(inode, os.O_RDONLY, None)).fh  # type: ignore[arg-type]  # unused
    block = bytes(range(256)) * 16
    clusters = list(range(SIZE // CLUSTER))
    rng.shuffle(clusters)

    async def write(i: int) -> None:
        await empty.write(clusters[i] * CLUSTER + 8192, block)

    in_place = offsets(WARMUP + 1000, 4096)

    async def write_in_place(i: int) -> None:
        await qcow2.write(in_place[i], block)

    async def discard(i: int) -> None:
        await trim.discard(clusters[i] * CLUSTER, CLUSTER)

    fuse_reads = offsets(WARMUP + 1000, 4096)

    async def fuse_read(i: int) -> None:
        await ops.read(fh, fuse_reads[i], 4096)

    async def change(i: int) -> None:
        await swapped.change(f"{d}/{('alt', 'base')[i % 2]}.qcow2,read-only=on")

    calls = {
        "read4k-raw": reads(raw, 4096),
        "read4k-qcow2": reads(qcow2, 4096),
        "read4k-chain": reads(chain, 4096),
        "read1m-qcow2": reads(qcow2, MiB),
        "write4k-alloc-qcow2": write,
        "write4k-qcow2": write_in_place,
        "discard64k-qcow2": discard,
        "fuse-read4k-qcow2": fuse_read,
        "media-change": change,
    }

    async def prime_chain() -> None:  # every cluster read once: the steady state
        buf = memoryview(bytearray(4096))
        for offset in range(0, SIZE, CLUSTER):
            await chain.readinto(offset, buf)

    primes = {"read4k-chain": prime_chain}
    for op in OPERATIONS:
        if op.name not in only:
            continue
        call = calls[op.name]
        if op.name in primes:
            await primes[op.name]()
        for i in range(WARMUP):
            await call(i)
        MARKER()
        for i in range(WARMUP, WARMUP + op.count):
            await call(i)
        MARKER()
    await layer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(op.name for op in OPERATIONS))
    ap.add_argument(
        "--prepare",
        action="store_true",
        help="only make the images in DIR (outside callgrind: it is slow there)",
    )
    ap.add_argument(
        "dir",
        nargs="?",
        help="the images, made by --prepare (default: made in a temporary directory first)",
    )
    args = ap.parse_args()
    only = args.only.split(",")
    unknown = set(only) - {op.name for op in OPERATIONS}
    if unknown:
        ap.error(f"unknown operations: {', '.join(sorted(unknown))}")
    if args.prepare:
        if not args.dir:
            ap.error("--prepare needs a directory")
        trio.run(prepare, Path(args.dir))
    elif args.dir:
        trio.run(run, Path(args.dir), only)
    else:
        with tempfile.TemporaryDirectory(prefix="blkfs-perf-") as d:
            trio.run(prepare, Path(d))
            trio.run(run, Path(d), only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
