"""The qcow2 bitmap directory: packed and parsed back unchanged; any bytes parse or give a
FormatError, nothing else."""

from __future__ import annotations

from blkfs_drivers.qcow2 import bitmap_directory as directory
from blkfs_drivers.qcow2.bitmap_directory import StoredBitmap
from blkfs_drivers.qcow2.ondisk import BitmapDirEntry, FormatError
from hypothesis import given
from hypothesis import strategies as st

NAMES = st.text(min_size=1, max_size=40).filter(lambda n: len(n.encode()) <= directory.MAX_NAME)


@st.composite
def stored(draw: st.DrawFn, name: str) -> StoredBitmap:
    extra = draw(st.binary(max_size=24))
    encoded = name.encode()
    entry = BitmapDirEntry(
        draw(st.integers(0, (1 << 56) - 1)) & BitmapDirEntry.TABLE_OFFSET_MASK,
        draw(st.integers(0, 1 << 20)),
        draw(st.integers(0, 7)),
        directory.TYPE_DIRTY_TRACKING,
        draw(st.integers(directory.MIN_GRANULARITY_BITS, directory.MAX_GRANULARITY_BITS)),
        len(encoded),
        len(extra),
    )
    return StoredBitmap(entry, extra, name)


@st.composite
def directories(draw: st.DrawFn) -> list[StoredBitmap]:
    names = draw(st.lists(NAMES, max_size=6, unique=True))
    return [draw(stored(name)) for name in names]


@given(directories())
def test_a_directory_round_trips(bitmaps: list[StoredBitmap]) -> None:
    packed = directory.pack(bitmaps)
    assert len(packed) % 8 == 0
    assert directory.parse(packed, len(bitmaps)) == bitmaps


@given(directories())
def test_flags_change_nothing_else(bitmaps: list[StoredBitmap]) -> None:
    in_use = [b.with_flags(b.entry.flags | directory.FLAG_IN_USE) for b in bitmaps]
    assert len(directory.pack(in_use)) == len(directory.pack(bitmaps))
    assert [(b.name, b.extra, b.entry.granularity_bits) for b in in_use] == [
        (b.name, b.extra, b.entry.granularity_bits) for b in bitmaps
    ]


@given(st.binary(max_size=512), st.integers(0, 8))
def test_any_bytes_parse_or_are_a_format_error(data: bytes, count: int) -> None:
    try:
        parsed = directory.parse(data, count)
    except FormatError:
        return
    assert len(parsed) == count
    assert directory.pack(parsed) == data


@given(directories(), st.integers(1, 7))
def test_a_truncated_directory_is_a_format_error(bitmaps: list[StoredBitmap], cut: int) -> None:
    packed = directory.pack(bitmaps)
    if not packed:
        return
    try:
        directory.parse(packed[:-cut], len(bitmaps))
    except FormatError:
        return
    raise AssertionError("a truncated directory parsed")


def test_table_size_is_one_entry_per_data_cluster() -> None:
    assert directory.table_size(64 << 20, 65536, 65536) == 1
    assert directory.table_size(65536 * 8 * 65536 + 1, 65536, 65536) == 2  # 32 GiB each
    assert directory.table_size(0, 512, 512) == 0
