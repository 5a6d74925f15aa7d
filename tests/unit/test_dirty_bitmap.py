"""Dirty bitmaps against a model: a set of dirty chunk numbers."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.block.dirty import DirtyBitmap, DirtyBitmaps
from blkfs.errors import BlockError

GRANULARITIES = st.sampled_from([512, 1024, 4096, 65536])
SIZE = st.integers(0, 1 << 22)


def requests(size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(
        st.integers(0, max(size - 1, 0)).flatmap(
            lambda offset: st.tuples(st.just(offset), st.integers(0, size - offset))
        ),
        max_size=12,
    )


def chunks_of(granularity: int, size: int, marks: list[tuple[int, int]]) -> set[int]:
    """The model: every chunk a request touches, within the size."""
    dirty: set[int] = set()
    for offset, length in marks:
        end = min(offset + length, size)
        if length and offset < end:
            dirty.update(range(offset // granularity, -(-end // granularity)))
    return dirty


def chunks_in(bitmap: DirtyBitmap) -> set[int]:
    dirty: set[int] = set()
    for offset, length in bitmap.dirty_extents(0, bitmap.size):
        assert offset % bitmap.granularity == 0
        assert (offset + length) % bitmap.granularity == 0 or offset + length == bitmap.size
        dirty.update(
            range(offset // bitmap.granularity, -(-(offset + length) // bitmap.granularity))
        )
    return dirty


@st.composite
def marked(draw: st.DrawFn) -> tuple[DirtyBitmap, set[int]]:
    granularity, size = draw(GRANULARITIES), draw(SIZE)
    marks = draw(requests(size))
    bitmap = DirtyBitmap("b", size, granularity)
    for offset, length in marks:
        bitmap.mark(offset, length)
    return bitmap, chunks_of(granularity, size, marks)


@given(marked())
def test_marks_are_the_chunks_the_requests_touch(case: tuple[DirtyBitmap, set[int]]) -> None:
    bitmap, model = case
    assert chunks_in(bitmap) == model
    last = bitmap.chunks_for(bitmap.size) - 1
    expected = sum(
        min(bitmap.granularity, bitmap.size - chunk * bitmap.granularity) for chunk in model
    )
    assert bitmap.count() == expected
    assert all(bitmap.is_dirty(c * bitmap.granularity) == (c in model) for c in range(last + 1))


@given(marked(), st.data())
def test_extents_of_a_range_are_the_dirty_runs_clipped_to_it(
    case: tuple[DirtyBitmap, set[int]], data: st.DataObject
) -> None:
    bitmap, model = case
    offset = data.draw(st.integers(0, bitmap.size))
    end = offset + data.draw(st.integers(0, bitmap.size - offset))
    expected: list[tuple[int, int]] = []
    for chunk in sorted(model):
        lo = max(offset, chunk * bitmap.granularity)
        hi = min(end, (chunk + 1) * bitmap.granularity)
        if lo >= hi:
            continue
        if expected and sum(expected[-1]) == lo:
            expected[-1] = (expected[-1][0], hi - expected[-1][0])
        else:
            expected.append((lo, hi - lo))
    assert list(bitmap.dirty_extents(offset, end - offset)) == expected


@given(marked(), marked())
def test_merge_marks_the_union(
    first: tuple[DirtyBitmap, set[int]], second: tuple[DirtyBitmap, set[int]]
) -> None:
    into, model = first
    source, theirs = second
    into.merge(source)
    expected = set(model)
    for chunk in theirs:  # a dirty chunk stands for the bytes of the disk it covers
        start = chunk * source.granularity
        length = min(source.granularity, source.size - start)
        expected |= chunks_of(into.granularity, into.size, [(start, length)])
    assert chunks_in(into) == expected


@given(marked(), SIZE)
def test_clear_and_resize(case: tuple[DirtyBitmap, set[int]], size: int) -> None:
    bitmap, model = case
    bitmap.resize(size)
    assert chunks_in(bitmap) == {c for c in model if c * bitmap.granularity < size}
    bitmap.clear()
    assert bitmap.count() == 0 and list(bitmap.dirty_extents(0, size)) == []


@given(marked())
def test_bits_round_trip_through_their_bytes(case: tuple[DirtyBitmap, set[int]]) -> None:
    bitmap, model = case
    again = DirtyBitmap("c", bitmap.size, bitmap.granularity, bits=bytes(bitmap.bits))
    assert chunks_in(again) == model
    for chunk in model:  # QEMU's order: bit i is bit i % 8 of byte i // 8
        assert bitmap.bits[chunk // 8] >> chunk % 8 & 1


def test_only_recording_bitmaps_mark() -> None:
    bitmaps = DirtyBitmaps("n")
    on, off = DirtyBitmap("on", 1 << 20), DirtyBitmap("off", 1 << 20, enabled=False)
    stale = DirtyBitmap("stale", 1 << 20, inconsistent=True)
    for bitmap in (on, off, stale):
        bitmaps.add(bitmap)
    bitmaps.mark(0, 1)
    assert (on.count(), off.count(), stale.count()) == (65536, 0, 0)


@pytest.mark.parametrize("granularity", [0, 256, 3000, 1 << 32])
def test_a_bad_granularity_is_refused(granularity: int) -> None:
    with pytest.raises(BlockError) as caught:
        DirtyBitmap("b", 1 << 20, granularity)
    assert caught.value.errno == errno.EINVAL


def test_names_are_unique_per_node() -> None:
    bitmaps = DirtyBitmaps("n")
    bitmaps.add(DirtyBitmap("b", 4096))
    with pytest.raises(BlockError) as caught:
        bitmaps.add(DirtyBitmap("b", 4096))
    assert caught.value.errno == errno.EEXIST
