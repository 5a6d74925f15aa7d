"""Property tests for the I/O-free half of the qcow2 driver.

Address arithmetic, entry decoding, refcount packing, header (de)serialisation, the metadata
cache and header building are pure functions of their inputs, so their promises (docstrings,
QEMU's docs/interop/qcow2.txt) can be checked over many generated inputs without an image.
A bit slip here corrupts every image silently, which is why it is tested in isolation.
"""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError
from drivers.qcow2.cache import TableCache
from drivers.qcow2.create import CREATE_OPTIONS, build_header
from drivers.qcow2.format import (INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, MAGIC,
                                  MAX_BACKING_NAME, FormatError, Header, parse_header)
from drivers.qcow2.layout import (ALL_ALLOCATED, ALL_ZERO, OFFSET_MASK, OFLAG_COMPRESSED,
                                  OFLAG_COPIED, OFLAG_ZERO, SECTOR, SUBCLUSTERS, Geometry,
                                  Kind, data_run, decode, fully_allocated, get_refcount,
                                  refcount_entries, set_refcount)
from tests.conftest import needs_qemu

FAST = settings(max_examples=60, deadline=None)

cluster_bits_st = st.integers(min_value=9, max_value=21)
geometries = st.builds(Geometry, cluster_bits_st, st.booleans())
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
guest_offsets = st.integers(min_value=0, max_value=(1 << 62) - 1)
refcount_orders = st.integers(min_value=0, max_value=6)


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
def test_compressed_range_follows_the_spec_bit_layout(
        case: tuple[Geometry, int, int, int]) -> None:
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
        case: tuple[Geometry, int, int, int], copied: bool, bitmap: int, sc: int) -> None:
    g, descriptor, _, _ = case
    entry = descriptor | OFLAG_COMPRESSED | (OFLAG_COPIED if copied else 0)
    mapping = decode(entry, bitmap, g, sc)
    assert mapping.kind is Kind.COMPRESSED
    assert (mapping.host, mapping.length) == g.compressed_range(descriptor)
    assert not fully_allocated(entry, bitmap, g)


@FAST
@given(cluster_bits_st, u64, u64, st.integers(0, SUBCLUSTERS - 1))
def test_standard_entry_kind_follows_zero_flag_then_offset(
        bits: int, entry: int, bitmap: int, sc: int) -> None:
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
        bits: int, entry: int, bitmap: int, other: int, sc: int) -> None:
    g = Geometry(bits)
    assert decode(entry, bitmap, g, sc) == decode(entry, other, g, 0)


@st.composite
def l2_runs(draw: st.DrawFn) -> tuple[Geometry, list[int], int]:
    """A standard L2 table of data clusters mostly back to back on disk, broken now and then
    by a zero, compressed, unallocated or elsewhere-allocated entry; and a host start."""
    g = Geometry(draw(st.integers(9, 21)))
    start = draw(st.integers(1, 1 << 20)) * g.cluster_size
    table, host = [], start
    for kind in draw(st.lists(st.sampled_from(["next"] * 6 + ["zero", "compressed", "unalloc",
                                                              "jump", "copied"]),
                              min_size=1, max_size=40)):
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
        case: tuple[Geometry, list[int], int], limit: int) -> None:
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
@given(st.integers(14, 21), u64, u64, st.integers(0, SUBCLUSTERS - 1))
def test_extended_subcluster_kind_follows_its_own_two_bitmap_bits(
        bits: int, entry: int, bitmap: int, sc: int) -> None:
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
        g: Geometry, entry: int, bitmap: int) -> None:
    entry = _valid_entry(entry, g)
    if g.extended_l2 and entry & OFLAG_COPIED and entry & OFFSET_MASK and bitmap % 7 == 0:
        bitmap = ALL_ALLOCATED  # make the interesting case common
    every = all(m.kind is Kind.NORMAL and m.copied and m.host == entry & OFFSET_MASK
                for m in (decode(entry, bitmap, g, sc) for sc in range(SUBCLUSTERS)))
    assert fully_allocated(entry, bitmap, g) == every


# -- refcount blocks ------------------------------------------------------------------------

@FAST
@given(cluster_bits_st, refcount_orders)
def test_a_refcount_block_is_one_cluster_of_entries(bits: int, order: int) -> None:
    assert refcount_entries(bits, order) * (1 << order) == (1 << bits) * 8


@st.composite
def refcount_blocks(draw: st.DrawFn) -> tuple[int, bytearray]:
    order = draw(refcount_orders)
    block = bytearray(draw(st.binary(min_size=64, max_size=64)))
    return order, block


@FAST
@given(refcount_blocks(), st.data())
def test_set_then_get_refcount_round_trips_and_touches_nothing_else(
        case: tuple[int, bytearray], data: st.DataObject) -> None:
    order, block = case
    count = refcount_entries(9, order) * len(block) // 512
    index = data.draw(st.integers(0, count - 1), label="index")
    value = data.draw(st.integers(0, (1 << (1 << order)) - 1), label="value")
    before = [get_refcount(block, i, order) for i in range(count)]
    set_refcount(block, index, order, value)
    after = [get_refcount(block, i, order) for i in range(count)]
    assert after[index] == value
    assert after[:index] + after[index + 1:] == before[:index] + before[index + 1:]


@FAST
@given(refcount_orders, st.data())
def test_refcounts_pack_like_qemu(order: int, data: st.DataObject) -> None:
    """Byte-wide and wider: big-endian. Narrower: entry 0 in the lowest bits of byte 0."""
    bits = 1 << order
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=64 // bits * 8,
                                max_size=64 // bits * 8))
    block = bytearray(len(values) * bits // 8)
    for i, value in enumerate(values):
        set_refcount(block, i, order, value)
    if bits >= 8:
        assert bytes(block) == b"".join(v.to_bytes(bits // 8, "big") for v in values)
    else:
        per_byte = 8 // bits
        for n, byte in enumerate(block):
            assert byte == sum(values[n * per_byte + k] << (k * bits) for k in range(per_byte))


@FAST
@given(refcount_orders, st.integers(0, 15), st.one_of(st.integers(max_value=-1),
                                                      st.integers(min_value=1 << 64)))
def test_a_refcount_that_does_not_fit_is_refused_and_changes_nothing(
        order: int, index: int, value: int) -> None:
    block = bytearray(range(128))
    with pytest.raises(OverflowError):
        set_refcount(block, index, order, value)
    with pytest.raises(OverflowError):
        set_refcount(block, index, order, 1 << (1 << order))
    assert block == bytearray(range(128))


@needs_qemu
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_get_refcount_reads_qemu_img_refcount_blocks(tmp_path: Path, refcount_bits: int) -> None:
    """qemu-img's new 3M image, 512-byte clusters, uses 5 clusters, each with refcount 1.

    Five is odd, so a nibble- or bit-order slip for narrow refcounts would show here.
    """
    image = tmp_path / "r.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"refcount_bits={refcount_bits},cluster_size=512", str(image), "3M"],
                   check=True)
    data = image.read_bytes()
    header = parse_header(data[:512])
    table = header.refcount_table_offset
    block_offset = int.from_bytes(data[table:table + 8], "big")
    block = data[block_offset:block_offset + 512]
    order = header.refcount_order
    counts = [get_refcount(block, i, order) for i in range(refcount_entries(9, order))]
    assert counts[:5] == [1] * 5
    assert not any(counts[5:])


# -- header format --------------------------------------------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@st.composite
def headers(draw: st.DrawFn, versions: tuple[int, ...] = (2, 3),
            feature_table: st.SearchStrategy[bool] = st.booleans()) -> Header:
    version = draw(st.sampled_from(versions))
    v3 = version == 3
    return Header(
        version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=draw(st.integers(10, 21)), size=draw(u64),
        crypt_method=draw(st.integers(0, 2)), l1_size=draw(st.integers(0, 2**32 - 1)),
        l1_table_offset=draw(u64), refcount_table_offset=draw(u64),
        refcount_table_clusters=draw(st.integers(0, 2**32 - 1)),
        nb_snapshots=draw(st.integers(0, 2**32 - 1)), snapshots_offset=draw(u64),
        incompatible_features=draw(u64) if v3 else 0,
        compatible_features=draw(u64) if v3 else 0,
        autoclear_features=draw(u64) if v3 else 0,
        refcount_order=draw(refcount_orders) if v3 else 4,
        header_length=112 if v3 else 72,
        compression_type=draw(st.integers(0, 1)) if v3 else 0,
        with_feature_table=draw(feature_table))


FIELDS = ("version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
          "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
          "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
          "incompatible_features", "compatible_features", "autoclear_features",
          "refcount_order", "header_length", "compression_type", "backing_file",
          "backing_format")


def _image_start(header: Header) -> bytes:
    return header.pack() + (header.backing_file or "").encode()


@FAST
@given(headers(), st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_pack_then_parse_round_trips(header: Header, backing: str | None,
                                     fmt: str | None) -> None:
    header = header.with_backing(backing, fmt)
    data = _image_start(header)
    assume(len(data) <= header.cluster_size)
    parsed = parse_header(data + bytes(header.cluster_size - len(data)))
    assert {f: getattr(parsed, f) for f in FIELDS} == {f: getattr(header, f) for f in FIELDS}
    assert parsed.unknown_extensions == []


@FAST
@given(headers(), names, st.one_of(st.none(), names))
def test_the_backing_name_lies_right_after_the_extensions(header: Header, backing: str,
                                                         fmt: str | None) -> None:
    header = header.with_backing(backing, fmt)
    data = _image_start(header)
    assert header.backing_file_offset == len(header.pack())
    assert data[header.backing_file_offset:] == backing.encode()
    assert header.backing_file_size == len(backing.encode())


@FAST
@given(headers(), st.one_of(st.none(), names), names)
def test_without_a_backing_file_no_backing_format_is_kept(
        header: Header, backing: str | None, fmt: str) -> None:
    cleared = header.with_backing(backing, fmt).with_backing(None, fmt)
    assert (cleared.backing_file, cleared.backing_format) == (None, None)
    assert (cleared.backing_file_offset, cleared.backing_file_size) == (0, 0)


@FAST
@given(headers(versions=(3,), feature_table=st.just(True)))
def test_v3_feature_table_names_the_known_bits(header: Header) -> None:
    assume(len(header.pack()) <= header.cluster_size)
    parsed = parse_header(header.pack())
    assert parsed.feature_names[(0, 4)] == "extended L2 entries"
    assert parsed.feature_names[(1, 0)] == "lazy refcounts"


def _parses_or_format_error(data: bytes) -> None:
    try:
        header = parse_header(data)
    except FormatError:
        return
    assert header.version in (2, 3)
    assert 9 <= header.cluster_bits <= 21


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_parse_header_only_raises_format_error_on_arbitrary_bytes(data: bytes) -> None:
    _parses_or_format_error(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_parse_header_only_raises_format_error_after_the_magic(tail: bytes) -> None:
    _parses_or_format_error(MAGIC + tail)


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A real header start with fields and bytes overwritten, so parsing gets deep."""
    header = draw(headers())
    backing = draw(st.one_of(st.none(), names))
    header = header.with_backing(backing, draw(st.one_of(st.none(), names)))
    data = bytearray(_image_start(header))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
    cut = draw(st.integers(0, len(data) + 64))
    return bytes(data[:cut]) + bytes(max(0, cut - len(data)))


@settings(max_examples=200, deadline=None)
@given(damaged_images())
def test_parse_header_only_raises_format_error_on_damaged_headers(data: bytes) -> None:
    _parses_or_format_error(data)


@FAST
@given(headers(), st.integers(MAX_BACKING_NAME + 1, 4000))
def test_a_backing_name_over_1023_bytes_is_refused(header: Header, length: int) -> None:
    header = header.with_backing("b" * length, None)
    data = _image_start(header)
    with pytest.raises(FormatError):
        parse_header(data + bytes(max(0, header.cluster_size - len(data))))


# -- TableCache -----------------------------------------------------------------------------

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 9), st.booleans()),
    st.tuples(st.just("get"), st.integers(0, 9), st.just(False)),
    st.tuples(st.just("dirty"), st.integers(0, 9), st.just(False)),
    st.tuples(st.just("pop"), st.integers(0, 9), st.just(False)),
    st.tuples(st.just("evict"), st.just(0), st.just(False)),
), max_size=60)


@FAST
@given(st.integers(-3, 6), ops)
def test_table_cache_behaves_like_an_lru_list(capacity: int,
                                             steps: list[tuple[str, int, bool]]) -> None:
    """Against a model: a recency list (oldest first), the tables and the dirty set."""
    cache: TableCache[str] = TableCache(capacity)
    assert cache.capacity == max(capacity, 2)
    order: list[int] = []
    tables: dict[int, str] = {}
    dirty: set[int] = set()
    for n, (op, offset, flag) in enumerate(steps):
        if op == "put":
            cache.put(offset, f"t{n}", dirty=flag)
            order = [o for o in order if o != offset] + [offset]
            tables[offset] = f"t{n}"
            dirty |= {offset} if flag else set()
        elif op == "get":
            assert cache.get(offset) == tables.get(offset)
            if offset in tables:
                order = [o for o in order if o != offset] + [offset]
        elif op == "dirty" and offset in tables:
            cache.mark_dirty(offset)
            dirty.add(offset)
        elif op == "pop":
            assert cache.pop(offset) == tables.pop(offset, None)
            order = [o for o in order if o != offset]
            dirty.discard(offset)
        elif op == "evict":  # what the driver does: write back and drop victims in turn
            while (victim := cache.victim()) is not None:
                assert victim == order[0]
                cache.pop(victim)
                del tables[order.pop(0)]
                dirty.discard(victim)
            assert len(cache) <= cache.capacity
        assert len(cache) == len(order)
        assert cache.victim() == (order[0] if len(order) > cache.capacity else None)
        assert cache.dirty_items() == [(o, tables[o]) for o in sorted(dirty)]


@FAST
@given(st.integers(2, 8), st.integers(0, 8))
def test_table_cache_names_no_victim_until_over_capacity(capacity: int, extra: int) -> None:
    cache: TableCache[int] = TableCache(capacity)
    for offset in range(capacity):
        cache.put(offset, offset)
        assert cache.victim() is None
    for offset in range(capacity, capacity + extra):
        cache.put(offset, offset)
        assert cache.victim() == offset - capacity
        cache.pop(offset - capacity)
    assert len(cache) == capacity


@FAST
@given(st.integers(2, 6))
def test_a_get_saves_a_table_from_eviction(capacity: int) -> None:
    cache: TableCache[int] = TableCache(capacity)
    for offset in range(capacity):
        cache.put(offset, offset)
    assert cache.get(0) == 0
    cache.put(capacity, capacity)
    assert cache.victim() == 1


@FAST
@given(st.integers(0, 9))
def test_a_clean_put_does_not_hide_an_unwritten_change(offset: int) -> None:
    cache: TableCache[bytes] = TableCache(4)
    cache.put(offset, b"new", dirty=True)
    cache.put(offset, b"newer")
    assert cache.dirty_items() == [(offset, b"newer")]


# -- build_header ---------------------------------------------------------------------------

def _size_spellings(cluster_bits: int) -> st.SearchStrategy[str]:
    size = 1 << cluster_bits
    spellings = [str(size)]
    if size >= 1024:
        spellings.append(f"{size >> 10}k")
    if size >= 1 << 20:
        spellings.append(f"{size >> 20}M")
    return st.sampled_from(spellings)


@st.composite
def valid_options(draw: st.DrawFn) -> dict[str, str]:
    cluster_bits = draw(cluster_bits_st)
    compat = draw(st.sampled_from(["1.1", "v3", "0.10", "v2"]))
    v3 = compat in ("1.1", "v3")
    options = {
        "cluster_size": draw(_size_spellings(cluster_bits)),
        "compat": compat,
        "refcount_bits": str(draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))) if v3 else "16",
        "compression_type": draw(st.sampled_from(["zlib", "zstd"])) if v3 else "zlib",
        "extended_l2": (draw(st.sampled_from(["on", "off"])) if v3 and cluster_bits >= 14
                        else "off"),
    }
    keep = draw(st.sets(st.sampled_from(sorted(options))))
    return {key: value for key, value in options.items() if key in keep}


def _spelled_bytes(spelling: str) -> int:
    """Bytes in one of the spellings _size_spellings makes (65536, 64k, 2M)."""
    match = re.fullmatch(r"(\d+)([kM]?)", spelling)
    assert match is not None
    return int(match[1]) << {"": 0, "k": 10, "M": 20}[match[2]]


DEFAULTS = {"cluster_size": "65536", "compat": "1.1", "refcount_bits": "16",
            "compression_type": "zlib", "extended_l2": "off"}


@FAST
@given(valid_options(), st.integers(0, 1 << 50).map(lambda n: n * 512),
       st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_valid_options_build_the_header_they_ask_for(
        options: dict[str, str], size: int, backing: str | None, fmt: str | None) -> None:
    chosen = DEFAULTS | options
    header = build_header(size, options, backing, fmt)
    assert header.cluster_size == _spelled_bytes(chosen["cluster_size"])
    assert header.version == (3 if chosen["compat"] in ("1.1", "v3") else 2)
    assert header.refcount_bits == int(chosen["refcount_bits"])
    assert header.extended_l2 == (chosen["extended_l2"] == "on")
    assert bool(header.incompatible_features & INCOMPAT_EXTL2) == header.extended_l2
    zstd = chosen["compression_type"] == "zstd"
    assert header.compression_type == int(zstd)
    assert bool(header.incompatible_features & INCOMPAT_COMPRESSION) == zstd
    assert header.size == size
    assert (header.backing_file, header.backing_format) == (backing, fmt if backing else None)


@FAST
@given(valid_options(), st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_a_built_header_fits_cluster_zero_and_parses_back(
        options: dict[str, str], backing: str | None, fmt: str | None) -> None:
    header = build_header(1 << 30, options, backing, fmt)
    data = _image_start(header)
    assert len(data) <= header.cluster_size
    parsed = parse_header(data)
    assert {f: getattr(parsed, f) for f in FIELDS} == {f: getattr(header, f) for f in FIELDS}


OUT_OF_RANGE = {
    "cluster_size": ["256", "1000", "4M", "3k", "96k", "64.5k", "1T"],
    "refcount_bits": ["0", "3", "12", "128", "-16"],
    "compat": ["1.0", "0.9", "v4", "", "1.10"],
    "compression_type": ["lz4", "ZLIB", "", "none"],
}
UNPARSABLE = {
    "cluster_size": ["abc", "64q", "-1", ""],
    "refcount_bits": ["x", "", "16bits", "1.5"],
    "extended_l2": ["maybe", "2", "", "onn"],
}


@st.composite
def one_bad_option(draw: st.DrawFn, values: dict[str, list[str]],
                   unknown: bool = False) -> tuple[dict[str, str], str]:
    """The defaults with one option made invalid, and that option's name."""
    options = DEFAULTS.copy()
    if unknown and draw(st.booleans()):
        name = draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
                    .filter(lambda s: s not in CREATE_OPTIONS))
        options[name] = "1"
    else:
        name = draw(st.sampled_from(sorted(values)))
        options[name] = draw(st.sampled_from(values[name]))
    return options, name


def _assert_einval_naming(options: dict[str, str], name: str) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, options, None, None)
    assert err.value.errno == errno.EINVAL
    assert name in str(err.value)


@FAST
@given(one_bad_option(OUT_OF_RANGE, unknown=True))
def test_an_unknown_or_out_of_range_option_is_einval_naming_it(
        case: tuple[dict[str, str], str]) -> None:
    _assert_einval_naming(*case)


@FAST
@given(one_bad_option(UNPARSABLE))
def test_an_unparsable_option_is_einval_naming_it(case: tuple[dict[str, str], str]) -> None:
    _assert_einval_naming(*case)


@FAST
@given(st.sampled_from(["0", "0k", "9" * 400 + "k"]))
def test_a_zero_or_absurd_cluster_size_is_einval_naming_it(value: str) -> None:
    _assert_einval_naming({"cluster_size": value}, "cluster_size")


@FAST
@given(st.integers(MAX_BACKING_NAME + 1, 4000))
def test_a_backing_name_over_the_limit_is_einval_at_create(length: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {}, "b" * length, None)
    assert err.value.errno == errno.EINVAL and "backing file name" in err.value.message


@FAST
@given(st.sampled_from(["0.10", "v2"]),
       st.sampled_from([("refcount_bits", "8"), ("compression_type", "zstd"),
                        ("extended_l2", "on")]))
def test_v2_refuses_v3_only_options_naming_compat(compat: str,
                                                  option: tuple[str, str]) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {"compat": compat, option[0]: option[1]}, None, None)
    assert err.value.errno == errno.EINVAL
    assert "compat" in str(err.value)


@FAST
@given(st.integers(9, 13))
def test_extended_l2_refuses_clusters_under_16k(cluster_bits: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {"cluster_size": str(1 << cluster_bits), "extended_l2": "on"},
                     None, None)
    assert err.value.errno == errno.EINVAL
    assert "extended_l2" in str(err.value) and "cluster_size" in str(err.value)


@FAST
@given(st.integers(9, 12))
def test_a_backing_name_too_big_for_cluster_zero_is_einval(cluster_bits: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {"cluster_size": str(1 << cluster_bits)},
                     "n" * (1 << cluster_bits), None)
    assert err.value.errno == errno.EINVAL
