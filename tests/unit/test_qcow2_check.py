"""The qcow2 checker without files: refcount comparison as pure values (hypothesis), and
whole checks of images laid out in memory."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from blkfs_drivers.qcow2.check import CheckResult, Tally, check, compare_block, highest_used
from blkfs_drivers.qcow2.create import build_header, empty_image
from blkfs_drivers.qcow2.mapping import OFLAG_COPIED
from blkfs_drivers.qcow2.ondisk import Header, get_refcount, set_refcount
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.errors import BlockError
from blkfs.layer import BlockLayer

CLUSTER = 4096


def qcow2(path: Path, options: str) -> str:
    """A qcow2 node over ``path`` with driver options (a plain path takes common ones only)."""
    return f"driver=qcow2,{options},file.driver=file,file.filename={path}"


class MemFile:
    """An image file in memory, recording what a repair does to it."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.writes: list[int] = []
        self.flushes = 0
        self.discards: list[int] = []

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes:
        assert offset + length <= len(self.data)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes | bytearray) -> None:
        self.data[offset : offset + len(data)] = data
        self.writes.append(offset)

    async def flush(self) -> None:
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> None:
        self.discards.append(offset)


class Image:
    """A new 4k-cluster v3 image as create makes it, with clusters allocated by hand."""

    def __init__(self, size: int = 1 << 20, order: int = 4) -> None:
        header = build_header(
            size, {"cluster_size": "4k", "refcount_bits": str(1 << order)}, None, None
        )
        self.file = MemFile(empty_image(header))
        self.header = Header.unpack(bytes(self.file.data[:CLUSTER]))
        self.refblock = struct.unpack_from(">Q", self.file.data, self.header.refcount_table_offset)[
            0
        ]

    def refcount(self, cluster: int) -> int:
        block = self.file.data[self.refblock : self.refblock + CLUSTER]
        return get_refcount(block, cluster, self.header.refcount_order)

    def set_refcount(self, cluster: int, value: int) -> None:
        block = bytearray(self.file.data[self.refblock : self.refblock + CLUSTER])
        set_refcount(block, cluster, self.header.refcount_order, value)
        self.file.data[self.refblock : self.refblock + CLUSTER] = block

    def new_cluster(self) -> int:
        offset = len(self.file.data)
        self.file.data += bytes(CLUSTER)
        self.set_refcount(offset // CLUSTER, 1)
        return offset

    def map(self, guest: int, host: int | None = None, flags: int = OFLAG_COPIED) -> int:
        """Point guest cluster ``guest`` at a new (or the given) host cluster."""
        l1_at = self.header.l1_table_offset
        l2 = struct.unpack_from(">Q", self.file.data, l1_at)[0] & ~OFLAG_COPIED
        if not l2:
            l2 = self.new_cluster()
            struct.pack_into(">Q", self.file.data, l1_at, l2 | OFLAG_COPIED)
        if host is None:
            host = self.new_cluster()
        struct.pack_into(">Q", self.file.data, l2 + 8 * guest, host | flags)
        return host


async def test_a_new_image_is_clean() -> None:
    image = Image()
    result = await check(image.file)
    assert result.clean and result.messages == []


async def test_leaks_are_found_and_repaired_safely() -> None:
    image = Image()
    data = image.map(3)
    image.map(5)
    leaked = image.new_cluster()  # referenced by nothing
    image.set_refcount(data // CLUSTER, 2)  # one reference too many
    before = bytes(image.file.data)
    result = await check(image.file)
    assert (result.leaks, result.corruptions) == (2, 1)  # as qemu-img: COPIED with refcount 2
    assert bytes(image.file.data) == before  # a check changes nothing
    repaired = await check(image.file, repair=True)
    assert repaired.leaks_fixed == 2 and repaired.corruptions == 0
    assert image.refcount(data // CLUSTER) == 1 and image.refcount(leaked // CLUSTER) == 0
    assert image.file.writes == [image.refblock] and image.file.flushes == 1
    assert image.file.discards == [leaked]  # space back only for the unreferenced cluster
    assert (await check(image.file)).clean


async def test_corruptions_are_reported_and_block_any_repair() -> None:
    image = Image()
    data = image.map(0)
    image.new_cluster()  # a leak, which must not be repaired on a corrupt image
    image.set_refcount(data // CLUSTER, 0)
    before = bytes(image.file.data)
    result = await check(image.file, repair=True)
    assert result.corruptions == 2 and result.leaks == 1 and result.leaks_fixed == 0
    assert any("refcount=0 reference=1" in m for m in result.messages)
    assert bytes(image.file.data) == before and image.file.writes == []


@pytest.mark.parametrize("case", ["past-end", "into-l1", "unaligned", "copied-shared"])
async def test_bad_references_are_corruptions(case: str) -> None:
    image = Image()
    if case == "past-end":
        image.map(1, host=len(image.file.data) + 4 * CLUSTER)
    elif case == "into-l1":
        image.map(1, host=image.header.l1_table_offset, flags=0)
    elif case == "unaligned":
        image.map(1, host=image.new_cluster() + 512)
    else:
        host = image.map(1)
        image.map(2, host=host)  # two references, both claiming to be the only one
        image.set_refcount(host // CLUSTER, 2)
    result = await check(image.file)
    assert result.corruptions, result.messages


@settings(max_examples=200, deadline=None)
@given(order=st.integers(0, 6), data=st.data())
def test_compare_block_classifies_every_refcount(order: int, data: st.DataObject) -> None:
    limit = (1 << (1 << order)) - 1
    entries = 512 * 8 >> order
    count = data.draw(st.integers(1, min(entries, 64)))
    stored = data.draw(st.lists(st.integers(0, limit), min_size=count, max_size=count))
    expected = data.draw(
        st.lists(st.integers(0, min(limit, 0xFFFFFFFF)), min_size=count, max_size=count)
    )  # the tally counts in 32 bits
    block = bytearray(512)
    for index, value in enumerate(stored):
        set_refcount(block, index, order, value)
    result = CheckResult()
    tally = Tally(9, 512 * (entries + 1), result)
    for cluster, value in enumerate(expected):
        tally.counts[cluster] = value
    repaired, freed = compare_block(block, 0, tally, order, result)
    leaks = [i for i in range(count) if stored[i] > expected[i]]
    assert result.leaks == len(leaks)
    assert result.corruptions == sum(s < e for s, e in zip(stored, expected, strict=True))
    assert freed == [i for i in leaks if expected[i] == 0]
    assert (repaired is None) == (not leaks)
    after = repaired if repaired is not None else block
    for index in range(entries):
        want = (
            min(stored[index], expected[index])
            if index < count and stored[index] > expected[index]
            else (stored[index] if index < count else 0)
        )
        assert get_refcount(after, index, order) == want
    used = [i for i in range(count) if stored[i]]
    assert highest_used(block, order) == (used[-1] if used else -1)


async def test_with_repair_leaks_a_writable_open_repairs_leaks_and_refuses_corruption(
    tmp_path: Path,
) -> None:
    image = Image()
    image.map(0)
    leaked = image.new_cluster()
    path = tmp_path / "leaky.qcow2"
    path.write_bytes(image.file.data)
    layer = BlockLayer()
    try:
        await layer.create("d", qcow2(path, "repair=leaks"))
    finally:
        await layer.close()
    with open(path, "rb") as f:
        f.seek(image.refblock)
        block = f.read(CLUSTER)
    assert get_refcount(block, leaked // CLUSTER, 4) == 0

    image.set_refcount(leaked // CLUSTER, 1)
    image.set_refcount(3, 0)  # the refcount table's cluster
    path.write_bytes(image.file.data)
    layer = BlockLayer()
    try:
        with pytest.raises(BlockError) as refused:
            await layer.create("d", qcow2(path, "repair=leaks"))
        assert refused.value.errno == errno.EUCLEAN
        assert "blkfs image check" in refused.value.message
        assert "d" not in layer
        await layer.create("ro", qcow2(path, "read-only=on,repair=leaks"))  # read-only still opens
    finally:
        await layer.close()
    assert path.read_bytes() == bytes(image.file.data)  # nothing was repaired


async def test_without_repair_a_writable_open_checks_nothing(tmp_path: Path) -> None:
    """As QEMU without its repair option: leaks stay, and an image whose refcounts are
    corrupt (but whose header has no corrupt bit) opens writable."""
    image = Image()
    image.map(0)
    leaked = image.new_cluster()
    image.set_refcount(3, 0)  # the refcount table's cluster
    path = tmp_path / "leaky.qcow2"
    path.write_bytes(image.file.data)
    layer = BlockLayer()
    try:
        backend = await layer.create("d", str(path))
        assert not backend.read_only
    finally:
        await layer.close()
    assert path.read_bytes() == bytes(image.file.data)
    assert image.refcount(leaked // CLUSTER) == 1


async def test_the_corrupt_bit_refuses_a_writable_open_whatever_repair_says(tmp_path: Path) -> None:
    image = Image()
    struct.pack_into(">Q", image.file.data, 72, 1 << 1)  # incompatible_features: corrupt
    path = tmp_path / "marked.qcow2"
    path.write_bytes(image.file.data)
    layer = BlockLayer()
    try:
        for repair in ("off", "leaks"):
            with pytest.raises(BlockError) as refused:
                await layer.create("d", qcow2(path, f"repair={repair}"))
            assert refused.value.errno == errno.EROFS and "corrupt" in refused.value.message
        await layer.create("ro", f"{path},read-only=on")
    finally:
        await layer.close()
