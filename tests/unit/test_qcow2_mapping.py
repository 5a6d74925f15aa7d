"""Property tests for qcow2 cluster mapping (:mod:`blkfs_drivers.qcow2.mapping`): indexes, entry
decoding, and the per-table mapping the driver's reads and writes use, checked against the
spec (QEMU's docs/interop/qcow2.txt) and against each other, with no image.

A bit slip here corrupts every image silently, which is why it is tested in isolation.
"""

from __future__ import annotations

import itertools
from array import array
from itertools import pairwise

import pytest
from blkfs_drivers.qcow2.mapping import (
    ALL_ALLOCATED,
    ALL_ZERO,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SECTOR,
    SUBCLUSTERS,
    Extents,
    Geometry,
    Kind,
    allocation_run,
    data_run,
    decode,
    fully_allocated,
    host_clusters,
    host_runs,
    in_place_run,
    l2_entry,
    map_table,
    reusable_host,
    set_l2_entry,
    unallocated_run,
    zero_entry,
    zeroed_entry,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError

FAST = settings(max_examples=60, deadline=None)

cluster_bits_st = st.integers(min_value=9, max_value=21)
geometries = st.builds(Geometry, cluster_bits_st, st.booleans())
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
guest_offsets = st.integers(min_value=0, max_value=(1 << 62) - 1)


# -- Geometry -------------------------------------------------------------------------------


@FAST
@given(geometries, guest_offsets)
def test_l1_and_l2_index_together_name_the_guest_cluster(g: Geometry, offset: int) -> None:
    assert 0 <= g.l2_index(offset) < g.l2_entries
    assert g.l1_index(offset) * g.l2_entries + g.l2_index(offset) == offset >> g.cluster_bits


@FAST
@given(geometries, guest_offsets)
def test_offsets_in_one_cluster_share_their_indexes(g: Geometry, offset: int) -> None:
    start = offset >> g.cluster_bits << g.cluster_bits
    end = start + g.cluster_size - 1
    assert (g.l1_index(start), g.l2_index(start)) == (g.l1_index(end), g.l2_index(end))


@FAST
@given(geometries)
def test_l2_table_fills_exactly_one_cluster(g: Geometry) -> None:
    assert g.l2_entries * g.l2_entry_size == g.cluster_size
    assert g.l2_entry_size == (16 if g.extended_l2 else 8)


@FAST
@given(geometries, st.integers(min_value=1, max_value=1 << 60))
def test_l1_size_for_is_the_least_that_maps_every_byte(g: Geometry, size: int) -> None:
    entries = g.l1_size_for(size)
    assert entries == g.l1_index(size - 1) + 1
    assert (entries - 1) * (g.l2_entries << g.cluster_bits) < size


@FAST
@given(geometries)
def test_an_empty_disk_needs_no_l1_entries(g: Geometry) -> None:
    assert g.l1_size_for(0) == 0


@FAST
@given(geometries)
def test_subclusters_split_a_cluster_only_with_extended_l2(g: Geometry) -> None:
    parts = SUBCLUSTERS if g.extended_l2 else 1
    assert g.subcluster_size * parts == g.cluster_size


@st.composite
def compressed_entries(draw: st.DrawFn) -> tuple[Geometry, int, int, int]:
    """(geometry, descriptor, host offset, additional sectors) per the spec's layout."""
    g = draw(geometries)
    shift = 62 - (g.cluster_bits - 8)  # spec: x = 62 - (cluster_bits - 8)
    host = draw(st.integers(min_value=0, max_value=(1 << shift) - 1))
    extra = draw(st.integers(min_value=0, max_value=(1 << (g.cluster_bits - 8)) - 1))
    return g, host | extra << shift, host, extra


@FAST
@given(compressed_entries())
def test_compressed_range_follows_the_spec_bit_layout(case: tuple[Geometry, int, int, int]) -> None:
    g, entry, host, extra = case
    assert g.csize_shift == 62 - (g.cluster_bits - 8)
    offset, length = g.compressed_range(entry)
    assert offset == host
    # The data runs from the offset to the end of the last of (extra + 1) sectors.
    assert length == (extra + 1) * SECTOR - host % SECTOR
    assert (offset + length) % SECTOR == 0
    assert 0 < length <= (1 << (g.cluster_bits - 8)) * SECTOR


# -- decode / fully_allocated ---------------------------------------------------------------


def _valid_entry(entry: int, g: Geometry) -> int:
    """Clear bits the spec reserves: 1-8 and 56-61 of standard entries, bit 0 with ext. L2."""
    if entry & OFLAG_COMPRESSED:
        return entry
    reserved_free = OFLAG_COPIED | OFFSET_MASK | (0 if g.extended_l2 else OFLAG_ZERO)
    return entry & reserved_free


@FAST
@given(compressed_entries(), st.booleans(), u64, st.integers(0, SUBCLUSTERS - 1))
def test_a_compressed_entry_decodes_to_its_range_whatever_else_is_set(
    case: tuple[Geometry, int, int, int], copied: bool, bitmap: int, sc: int
) -> None:
    g, descriptor, _, _ = case
    entry = descriptor | OFLAG_COMPRESSED | (OFLAG_COPIED if copied else 0)
    mapping = decode(entry, bitmap, g, sc)
    assert mapping.kind is Kind.COMPRESSED
    assert (mapping.host, mapping.length) == g.compressed_range(descriptor)
    assert not fully_allocated(entry, bitmap, g)


@FAST
@given(cluster_bits_st, u64, u64, st.integers(0, SUBCLUSTERS - 1))
def test_standard_entry_kind_follows_zero_flag_then_offset(
    bits: int, entry: int, bitmap: int, sc: int
) -> None:
    g = Geometry(bits)
    entry &= ~OFLAG_COMPRESSED
    mapping = decode(entry, bitmap, g, sc)
    host = entry & OFFSET_MASK
    if entry & OFLAG_ZERO:
        assert mapping.kind is Kind.ZERO
    elif host:
        assert (mapping.kind, mapping.host) == (Kind.NORMAL, host)
        assert mapping.copied == bool(entry & OFLAG_COPIED)
    else:
        assert mapping.kind is Kind.UNALLOCATED


@FAST
@given(cluster_bits_st, u64, u64, u64, st.integers(0, SUBCLUSTERS - 1))
def test_standard_entries_ignore_the_bitmap_and_subcluster(
    bits: int, entry: int, bitmap: int, other: int, sc: int
) -> None:
    g = Geometry(bits)
    assert decode(entry, bitmap, g, sc) == decode(entry, other, g, 0)


@st.composite
def l2_runs(draw: st.DrawFn) -> tuple[Geometry, list[int], int]:
    """A standard L2 table of data clusters mostly back to back on disk, broken now and then
    by a zero, compressed, unallocated or elsewhere-allocated entry; and a host start."""
    g = Geometry(draw(st.integers(9, 21)))
    start = draw(st.integers(1, 1 << 20)) * g.cluster_size
    table, host = [], start
    for kind in draw(
        st.lists(
            st.sampled_from(["next"] * 6 + ["zero", "compressed", "unalloc", "jump", "copied"]),
            min_size=1,
            max_size=40,
        )
    ):
        entry = host | (OFLAG_COPIED if kind == "copied" else 0)
        if kind == "zero":
            entry |= OFLAG_ZERO
        elif kind == "compressed":
            entry = OFLAG_COMPRESSED | draw(st.integers(0, (1 << 40) - 1))
        elif kind == "unalloc":
            entry = 0
        elif kind == "jump":
            entry = host + g.cluster_size * draw(st.integers(1, 8))
        table.append(entry)
        host += g.cluster_size
    return g, table, start


@FAST
@given(l2_runs(), st.integers(0, 45))
def test_a_data_run_counts_what_decode_calls_contiguous_data(
    case: tuple[Geometry, list[int], int], limit: int
) -> None:
    g, table, start = case
    limit = min(limit, len(table))
    expected, host = 0, start
    for entry in table[:limit]:
        mapping = decode(entry, 0, g, 0)
        if mapping.kind is not Kind.NORMAL or mapping.host != host:
            break
        expected += 1
        host += g.cluster_size
    assert data_run(table, 0, limit, start, g.cluster_size) == expected


@FAST
@given(st.lists(st.sampled_from([0, 0, 0, OFLAG_ZERO, 1 << 16]), max_size=40), st.integers(0, 45))
def test_an_unallocated_run_counts_what_decode_calls_unallocated(
    table: list[int], limit: int
) -> None:
    g = Geometry(16)
    limit = min(limit, len(table))
    expected = 0
    for entry in table[:limit]:
        if decode(entry, 0, g, 0).kind is not Kind.UNALLOCATED:
            break
        expected += 1
    assert unallocated_run(table, 0, limit) == expected


@FAST
@given(st.integers(14, 21), u64, u64, st.integers(0, SUBCLUSTERS - 1))
def test_extended_subcluster_kind_follows_its_own_two_bitmap_bits(
    bits: int, entry: int, bitmap: int, sc: int
) -> None:
    g = Geometry(bits, extended_l2=True)
    entry = _valid_entry(entry & ~OFLAG_COMPRESSED, g)
    mapping = decode(entry, bitmap, g, sc)
    zero, allocated = bitmap >> (SUBCLUSTERS + sc) & 1, bitmap >> sc & 1
    if zero:
        assert mapping.kind is Kind.ZERO
    elif allocated and entry & OFFSET_MASK:
        assert (mapping.kind, mapping.host) == (Kind.NORMAL, entry & OFFSET_MASK)
    else:
        assert mapping.kind is Kind.UNALLOCATED
    # Flipping every other subcluster's bits changes nothing for this one.
    own = 1 << sc | 1 << (SUBCLUSTERS + sc)
    assert decode(entry, bitmap ^ (ALL_ALLOCATED | ALL_ZERO) & ~own, g, sc) == mapping


@FAST
@given(geometries, u64, st.one_of(u64, st.sampled_from([ALL_ALLOCATED, ALL_ZERO, 0])))
def test_fully_allocated_iff_every_subcluster_is_copied_data(
    g: Geometry, entry: int, bitmap: int
) -> None:
    entry = _valid_entry(entry, g)
    if g.extended_l2 and entry & OFLAG_COPIED and entry & OFFSET_MASK and bitmap % 7 == 0:
        bitmap = ALL_ALLOCATED  # make the interesting case common
    every = all(
        m.kind is Kind.NORMAL and m.copied and m.host == entry & OFFSET_MASK
        for m in (decode(entry, bitmap, g, sc) for sc in range(SUBCLUSTERS))
    )
    assert fully_allocated(entry, bitmap, g) == every


# -- mapping a request ----------------------------------------------------------------------

DRAWN = 40


@st.composite
def l2_tables(draw: st.DrawFn) -> tuple[Geometry, array[int]]:
    """An L2 table whose first ``DRAWN`` entries are of every kind, with runs of data
    clusters back to back on the host (what map_table merges and in_place_run follows); the
    rest are unallocated."""
    g = Geometry(draw(st.sampled_from([9, 10, 14])), draw(st.booleans()))
    table = array("Q", bytes(g.cluster_size))
    host = draw(st.integers(4, 1 << 20)) * g.cluster_size
    for index in range(min(DRAWN, g.l2_entries)):
        kind = draw(
            st.sampled_from(
                ["next"] * 5 + ["zero", "compressed", "unalloc", "jump", "shared", "partial"]
            )
        )
        entry, bitmap = host | OFLAG_COPIED, ALL_ALLOCATED
        if kind == "zero":
            entry, bitmap = (entry, ALL_ZERO) if g.extended_l2 else (entry | OFLAG_ZERO, 0)
        elif kind == "compressed":
            entry, bitmap = OFLAG_COMPRESSED | draw(st.integers(0, (1 << 30) - 1)), 0
        elif kind == "unalloc":
            entry, bitmap = 0, 0
        elif kind == "jump":
            host += g.cluster_size * draw(st.integers(1, 4))
            entry = host | OFLAG_COPIED
        elif kind == "shared":
            entry &= ~OFLAG_COPIED
        elif kind == "partial":
            bitmap = draw(st.integers(0, (1 << 64) - 1))
            bitmap &= ~((bitmap >> SUBCLUSTERS) & ALL_ALLOCATED)  # never allocated and zero
        set_l2_entry(table, index, g.extended_l2, entry, bitmap if g.extended_l2 else 0)
        host += g.cluster_size
    return g, table


def pieces(g: Geometry, offset: int, end: int) -> list[tuple[int, int]]:
    """The range cut at every subcluster boundary: the unit a mapping can change at."""
    out, unit = [], g.subcluster_size
    while offset < end:
        span = min(unit - offset % unit, end - offset)
        out.append((offset, span))
        offset += span
    return out


def model(
    g: Geometry, table: array[int], offset: int, end: int
) -> list[tuple[int, int, Kind, int]]:
    """(guest offset, length, kind, host offset of the data) per piece, by decode() alone."""
    out = []
    for position, span in pieces(g, offset, end):
        entry, bitmap = l2_entry(table, g.l2_index(position), g.extended_l2)
        m = decode(entry, bitmap, g, (position % g.cluster_size) // g.subcluster_size)
        host = m.host + position % g.cluster_size if m.kind is Kind.NORMAL else 0
        out.append((position, span, m.kind, host))
    return out


def cut(g: Geometry, extents: Extents) -> list[tuple[int, int, Kind, int]]:
    """Mapped extents cut into the same pieces."""
    out = []
    for guest, length, m in extents:
        for position, span in pieces(g, guest, guest + length):
            host = (
                m.host + guest % g.cluster_size + position - guest if m.kind is Kind.NORMAL else 0
            )
            out.append((position, span, m.kind, host))
    return out


@settings(max_examples=80, deadline=None)
@given(l2_tables(), st.data())
def test_map_table_agrees_with_decode_piece_by_piece(
    case: tuple[Geometry, array[int]], data: st.DataObject
) -> None:
    """Merged or not, every byte maps where decode() says, and neighbours that could have
    been merged (same kind, data back to back) were."""
    g, table = case
    span = g.l2_entries * g.cluster_size
    offset = data.draw(st.integers(0, min(DRAWN + 1, g.l2_entries) * g.cluster_size - 1))
    end = data.draw(st.integers(offset + 1, min(span, offset + 8 * g.cluster_size)))
    base = span * 3  # the table maps the fourth L1 entry's range
    extents: Extents = []
    assert map_table(extents, g, base + offset, base + end, table) == base + end
    shifted = [(p - base, n, k, h) for p, n, k, h in cut(g, extents)]
    assert shifted == model(g, table, offset, end)
    for (guest, length, m), (following, _, n) in itertools.pairwise(extents):
        assert guest + length == following
        mergeable = (
            m.kind is n.kind
            and m.kind is not Kind.COMPRESSED
            and (
                m.kind is not Kind.NORMAL
                or m.host + guest % g.cluster_size + length == n.host + following % g.cluster_size
            )
        )
        assert not mergeable


@FAST
@given(geometries, st.data())
def test_map_table_stops_at_the_end_of_the_table_it_maps(g: Geometry, data: st.DataObject) -> None:
    span = g.l2_entries * g.cluster_size
    offset = data.draw(st.integers(0, 4 * span))
    end = offset + data.draw(st.integers(1, 3 * span))
    extents: Extents = []
    stop = map_table(extents, g, offset, end, None)
    assert stop == min(end, (offset // span + 1) * span)
    assert extents == [(offset, stop - offset, extents[0][2])]
    assert extents[0][2].kind is Kind.UNALLOCATED


@settings(max_examples=80, deadline=None)
@given(l2_tables(), st.data())
def test_in_place_run_is_the_longest_run_of_writable_clusters_back_to_back(
    case: tuple[Geometry, array[int]], data: st.DataObject
) -> None:
    g, table = case
    span = g.l2_entries * g.cluster_size
    offset = data.draw(st.integers(0, min(DRAWN + 1, g.l2_entries) * g.cluster_size - 1))
    end = data.draw(st.integers(offset + 1, span + g.cluster_size))
    run = in_place_run(g, table, offset, end)
    first = l2_entry(table, g.l2_index(offset), g.extended_l2)
    if not fully_allocated(*first, g):
        assert run is None
        return
    assert run is not None
    host, length = run
    assert host == (first[0] & OFFSET_MASK) + offset % g.cluster_size
    assert 0 < length <= end - offset
    for position in range(offset, offset + length, 512):  # every byte in place, contiguous
        entry, bitmap = l2_entry(table, g.l2_index(position), g.extended_l2)
        assert fully_allocated(entry, bitmap, g)
        assert (entry & OFFSET_MASK) + position % g.cluster_size == host + position - offset
    after = offset + length
    if after < min(end, span):  # it stopped where the next cluster cannot follow
        entry, bitmap = l2_entry(table, g.l2_index(after), g.extended_l2)
        assert not fully_allocated(entry, bitmap, g) or entry & OFFSET_MASK != host + length


@FAST
@given(l2_tables(), st.data())
def test_an_allocation_run_takes_the_first_cluster_then_whole_unwritable_ones(
    case: tuple[Geometry, array[int]], data: st.DataObject
) -> None:
    g, table = case
    index = data.draw(st.integers(0, min(DRAWN, g.l2_entries - 1)))
    start = index * g.cluster_size
    end = start + data.draw(st.integers(1, 6 * g.cluster_size))
    count = allocation_run(g, table, index, start, end)
    assert 1 <= count <= g.l2_entries - index
    for i in range(1, count):  # none it takes holds a host cluster it could write in place
        assert start + (i + 1) * g.cluster_size <= end
        entry, bitmap = l2_entry(table, index + i, g.extended_l2)
        assert not fully_allocated(entry, bitmap, g) and not reusable_host(entry)
    if index + count < g.l2_entries and start + (count + 1) * g.cluster_size <= end:
        entry, _ = l2_entry(table, index + count, g.extended_l2)
        assert reusable_host(entry)  # in place, or a zeroed cluster's own host cluster


@FAST
@given(geometries, u64, u64)
def test_a_reusable_host_is_an_unshared_uncompressed_cluster(
    g: Geometry, entry: int, bitmap: int
) -> None:
    entry = _valid_entry(entry, g)
    host = reusable_host(entry)
    if fully_allocated(entry, bitmap, g):
        assert host == entry & OFFSET_MASK  # (in place already: never asked)
    if host:
        assert entry & OFLAG_COPIED and not entry & OFLAG_COMPRESSED
        assert list(host_clusters(g, entry)) == [host]
    else:
        assert not entry & OFLAG_COPIED or entry & OFLAG_COMPRESSED or not entry & OFFSET_MASK


@FAST
@given(geometries, u64, u64, st.integers(0, 300))
def test_an_l2_entry_reads_back_as_set_and_touches_nothing_else(
    g: Geometry, entry: int, bitmap: int, index: int
) -> None:
    index %= g.l2_entries
    table = array("Q", range(g.cluster_size // 8))
    before = list(table)
    set_l2_entry(table, index, g.extended_l2, entry, bitmap)
    assert l2_entry(table, index, g.extended_l2) == (entry, bitmap if g.extended_l2 else 0)
    width = 2 if g.extended_l2 else 1
    assert [v for i, v in enumerate(table) if i // width != index] == [
        v for i, v in enumerate(before) if i // width != index
    ]


@FAST
@given(geometries, u64)
def test_host_clusters_are_the_clusters_an_entry_references(g: Geometry, entry: int) -> None:
    clusters = host_clusters(g, entry)
    if entry & OFLAG_COMPRESSED:
        host, length = g.compressed_range(entry & ~(OFLAG_COPIED | OFLAG_COMPRESSED))
        assert clusters[0] <= host and clusters[-1] + g.cluster_size >= host + length
        assert len(clusters) <= 2 + length // g.cluster_size
        assert all(c % g.cluster_size == 0 for c in clusters)
    elif entry & OFFSET_MASK:
        assert list(clusters) == [entry & OFFSET_MASK]
    else:
        assert list(clusters) == []


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("backing", [False, True])
def test_a_zero_entry_reads_as_zeros_where_the_image_has_one(
    extended: bool, version: int, backing: bool
) -> None:
    g = Geometry(16, extended)
    new = zero_entry(g, version, backing)
    if new is None:  # a v2 image over a backing file can only write zeros
        assert version == 2 and not extended and backing
        return
    kinds = {decode(*new, g, sc).kind for sc in range(SUBCLUSTERS)}
    assert kinds == (
        {Kind.UNALLOCATED} if (version, extended, new) == (2, False, (0, 0)) else {Kind.ZERO}
    )
    assert not host_clusters(g, new[0])


@FAST
@given(
    geometries,
    st.sampled_from([2, 3]),
    st.booleans(),
    u64,
    st.booleans(),
    st.integers(0, SUBCLUSTERS - 1),
)
def test_a_zeroed_cluster_reads_zeros_and_keeps_its_host_only_without_unmap(
    g: Geometry, version: int, backing: bool, entry: int, unmap: bool, sc: int
) -> None:
    if version == 2:
        g = Geometry(g.cluster_bits)
    entry = _valid_entry(entry, g)
    host = 0 if entry & OFLAG_COMPRESSED else entry & OFFSET_MASK
    new = zeroed_entry(g, version, backing, entry, unmap)
    keep = bool(host) and not unmap
    if new is None:  # a v2 image has no zero flag: zeros are written, or backing shows
        assert version == 2 and (keep or backing)
        return
    kind = decode(*new, g, sc).kind
    assert kind is Kind.ZERO or (new == (0, 0) and version == 2 and not backing)
    if keep:  # the same host cluster, writable in place again if it was
        assert list(host_clusters(g, new[0])) == [host]
        assert reusable_host(new[0]) == reusable_host(entry)
        assert not fully_allocated(*new, g)
    else:
        assert not host_clusters(g, new[0])


@FAST
@given(geometries, st.integers(0, 1 << 40))
def test_only_whole_clusters_after_the_header_are_valid(g: Geometry, offset: int) -> None:
    valid = offset % g.cluster_size == 0 and offset >= g.cluster_size
    try:
        g.check_cluster(offset, "L2 table")
    except BlockError as exc:
        assert not valid and "corrupt" in exc.message and "L2 table" in exc.message
    else:
        assert valid


@FAST
@given(st.sampled_from([512, 4096, 65536]), st.lists(st.integers(1, 200), max_size=60))
def test_host_runs_cover_exactly_the_clusters_in_fewest_runs(
    cluster_size: int, indexes: list[int]
) -> None:
    hosts = [i * cluster_size for i in indexes]
    runs = host_runs(hosts, cluster_size)
    covered = [start + k for start, length in runs for k in range(0, length, cluster_size)]
    assert covered == sorted(set(hosts))  # each freed cluster once, in order, nothing else
    for (start, length), (following, _) in pairwise(runs):
        assert start + length < following  # runs that touch would have been one
