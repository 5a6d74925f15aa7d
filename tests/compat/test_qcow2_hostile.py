"""Hostile qcow2 images: open fails, or the request fails with EIO, with a message; never a
hang, a crash or runaway memory. Each case is bounded in time."""

from __future__ import annotations

import errno
import random
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, convert, create, qemu, qemu_io
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount

pytestmark = [needs_qemu]

CLEAN_ERRNOS = {errno.EIO, errno.EINVAL, errno.ENOTSUP, errno.ELOOP, errno.EROFS, errno.ENOENT}


def patch(image: Path, offset: int, fmt: str, value: int) -> Path:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return image


def l1_offset(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(40)
        return struct.unpack(">Q", f.read(8))[0]


def first_l2_offset(image: Path) -> int:
    with open(image, "rb") as f:
        f.seek(l1_offset(image))
        return struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00


def written(d: Path, name: str = "img.qcow2", options: str = "") -> Path:
    image = create(d, name, options)
    qemu_io(image, "qcow2", "write -P 0xab 0 1M")
    return image


def truncated(d: Path) -> Path:
    image = d / "t.qcow2"
    image.write_bytes(b"QFI\xfb\0\0\0\3")
    return image


def loop(d: Path) -> Path:
    a, b = create(d, "a.qcow2"), create(d, "b.qcow2")
    qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    qemu("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    return a


def deep(d: Path, depth: int = 70) -> Path:
    image = create(d, "0.qcow2")
    for level in range(1, depth):
        image = create(d, f"{level}.qcow2", backing=image.name)
    return image


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated-header": (truncated, "header"),
    "version-1": (lambda d: patch(create(d, "i.qcow2"), 4, ">I", 1), "version"),
    "cluster-bits-30": (lambda d: patch(create(d, "i.qcow2"), 20, ">I", 30), "cluster"),
    "cluster-bits-8": (lambda d: patch(create(d, "i.qcow2"), 20, ">I", 8), "cluster"),
    "oversized-l1": (lambda d: patch(create(d, "i.qcow2"), 36, ">I", 1 << 30), "L1"),
    "l1-past-end": (lambda d: patch(create(d, "i.qcow2"), 40, ">Q", 1 << 40), "L1"),
    "l1-into-header": (lambda d: patch(create(d, "i.qcow2"), 40, ">Q", 0), "L1"),
    "reftable-past-end": (lambda d: patch(create(d, "i.qcow2"), 48, ">Q", 1 << 40), "refcount"),
    "reftable-oversized": (lambda d: patch(create(d, "i.qcow2"), 56, ">I", 1 << 28), "refcount"),
    "unknown-incompatible-bit": (
        lambda d: patch(create(d, "i.qcow2"), 72, ">Q", 1 << 40),
        "bit 40",
    ),
    "encrypted": (lambda d: patch(create(d, "i.qcow2"), 32, ">I", 1), "encrypted"),
    "refcount-order-7": (lambda d: patch(create(d, "i.qcow2"), 96, ">I", 7), "refcount"),
    "backing-name-past-end": (
        lambda d: patch(patch(create(d, "i.qcow2"), 8, ">Q", 1 << 30), 16, ">I", 100),
        "backing",
    ),
    "backing-name-huge": (
        lambda d: patch(patch(create(d, "i.qcow2"), 8, ">Q", 512), 16, ">I", 1 << 30),
        "backing",
    ),
    "backing-loop": (loop, "loop"),
    "chain-over-depth-limit": (deep, "deeper than"),
    "virtual-size-huge": (lambda d: patch(create(d, "i.qcow2"), 24, ">Q", 1 << 63), "size"),
}
"""Images that must not open: each with a word the error message must contain."""


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_image_fails_open_cleanly(images: Path, case: str) -> None:
    make, word = HOSTILE[case]
    image = make(images)
    layer = BlockLayer()
    with trio.fail_after(20):
        with pytest.raises(BlockError) as failure:
            await layer.create("d", str(image))
    assert failure.value.errno in CLEAN_ERRNOS
    assert word.lower() in failure.value.message.lower(), failure.value.message
    assert "d" not in layer


def l2_entry_past_end(d: Path) -> Path:
    image = written(d)
    return patch(image, first_l2_offset(image), ">Q", (1 << 63) | (1 << 45))


def l2_entry_unaligned(d: Path) -> Path:
    image = written(d)
    return patch(image, first_l2_offset(image), ">Q", (1 << 63) | 0x10200)


def l1_entry_past_end(d: Path) -> Path:
    image = written(d)
    return patch(image, l1_offset(image), ">Q", (1 << 63) | (1 << 45))


def compressed_past_end(d: Path) -> Path:
    image = convert(d, "img", compress=True)
    with open(image, "rb") as f:
        f.seek(first_l2_offset(image))
        entries = struct.unpack(">8192Q", f.read(65536))
    index = next(i for i, e in enumerate(entries) if e >> 62 & 1)
    return patch(image, first_l2_offset(image) + 8 * index, ">Q", (1 << 62) | (1 << 50) - 512)


BAD_TABLES: dict[str, Callable[[Path], Path]] = {
    "l1-entry-past-end": l1_entry_past_end,
    "l2-entry-past-end": l2_entry_past_end,
    "l2-entry-unaligned": l2_entry_unaligned,
    "compressed-past-end": compressed_past_end,
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
async def test_bad_table_entries_fail_the_request_with_eio(images: Path, case: str) -> None:
    image = BAD_TABLES[case](images)
    layer = BlockLayer()
    try:
        with trio.fail_after(20):
            backend = await layer.create("d", f"{image},read-only=on")
            failures = []
            for offset in range(0, backend.length(), MiB):
                try:
                    await backend.read(offset, MiB)
                except BlockError as exc:
                    failures.append(exc)
        assert failures, "the bad entry was never noticed"
        assert {exc.errno for exc in failures} == {errno.EIO}
        assert all("corrupt" in exc.message for exc in failures)
    finally:
        await layer.close()


async def test_mutated_images_never_hang_crash_or_raise_anything_but_block_errors(
    images: Path,
) -> None:
    """Random byte mutations of the metadata of a real image (header, reftable, refblock,
    L1, L2): every open (read-only, or writable with ``repair=leaks``, which checks and
    repairs the refcounts) and read either works or raises a BlockError, within a time and a
    memory bound."""
    pristine = written(images, "pristine.qcow2", "cluster_size=4k").read_bytes()
    metadata_end = 8 * 4096
    rng = random.Random(2024)
    outcomes = {"opened": 0, "refused": 0, "request-failed": 0}
    peak = 0
    tracemalloc.start()
    for round_ in range(150):
        data = bytearray(pristine)
        for _ in range(rng.randrange(1, 8)):
            where = rng.choice((128, metadata_end))  # half of them in the header fields
            data[rng.randrange(where)] = rng.randrange(256)
        image = images / f"m{round_ % 2}.qcow2"
        image.write_bytes(data)
        layer = BlockLayer()
        tracemalloc.reset_peak()
        try:
            with trio.fail_after(10):
                backend = await layer.create(
                    "d",
                    f"driver=qcow2,read-only={round_ % 2},"
                    f"repair=leaks,backing=null,"
                    f"file.driver=file,file.filename={image}",
                )
                outcomes["opened"] += 1
                for offset in range(0, min(backend.length(), 2 * MiB), 256 * 1024):
                    await backend.read(offset, 256 * 1024)
        except BlockError as exc:
            assert exc.errno in CLEAN_ERRNOS | {errno.EFBIG, errno.EUCLEAN}, exc
            outcomes["refused" if "d" not in layer else "request-failed"] += 1
        finally:
            await layer.close()
            peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    print(f"mutations: {outcomes}, peak Python memory per case {peak / MiB:.1f} MiB")
    assert peak < 64 * MiB
    assert outcomes["refused"] + outcomes["request-failed"] and outcomes["opened"]


@needs_fuse
def test_a_hostile_image_through_ctl_fails_the_write_and_the_daemon_lives(
    mount: Mount, images: Path
) -> None:
    image = patch(create(images, "i.qcow2"), 36, ">I", 1 << 30)
    assert mount.ctl_errno("create", f"d {image}") == errno.EIO
    assert "L1" in mount.last_error()
    assert "d" not in mount.backends()
    mount.ctl("create", f"ok {create(images, 'fine.qcow2')}")
    assert (mount / "ok").stat().st_size == 4 * MiB
