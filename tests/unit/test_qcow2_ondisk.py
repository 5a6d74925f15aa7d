"""Property tests for the qcow2 on-disk structures (:mod:`blkfs_drivers.qcow2.ondisk`): each
structure's pack and unpack are inverses, the header parser refuses damaged bytes with
FormatError and nothing else, and refcount entries pack as QEMU packs them.
"""

from __future__ import annotations

import subprocess
from array import array
from pathlib import Path

import pytest
from blkfs_drivers.qcow2.ondisk import (
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    KNOWN_FEATURES,
    MAGIC,
    MAX_BACKING_NAME,
    BitmapDirEntry,
    BitmapsExtension,
    CryptoExtension,
    Feature,
    FormatError,
    Header,
    HeaderExtension,
    SnapshotHeader,
    decode_table,
    encode_entry,
    encode_table,
    get_refcount,
    refcount_entries,
    set_refcount,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.conftest import needs_qemu

FAST = settings(max_examples=60, deadline=None)

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
u16 = st.integers(min_value=0, max_value=(1 << 16) - 1)
u8 = st.integers(min_value=0, max_value=255)
cluster_bits_st = st.integers(min_value=9, max_value=21)
refcount_orders = st.integers(min_value=0, max_value=6)


# -- header format --------------------------------------------------------------------------

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@st.composite
def headers(
    draw: st.DrawFn,
    versions: tuple[int, ...] = (2, 3),
    feature_table: st.SearchStrategy[bool] | None = None,
) -> Header:
    version = draw(st.sampled_from(versions))
    v3 = version == 3
    return Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=draw(st.integers(10, 21)),
        size=draw(u64),
        crypt_method=draw(st.integers(0, 2)),
        l1_size=draw(st.integers(0, 2**32 - 1)),
        l1_table_offset=draw(u64),
        refcount_table_offset=draw(u64),
        refcount_table_clusters=draw(st.integers(0, 2**32 - 1)),
        nb_snapshots=draw(st.integers(0, 2**32 - 1)),
        snapshots_offset=draw(u64),
        incompatible_features=draw(u64) if v3 else 0,
        compatible_features=draw(u64) if v3 else 0,
        autoclear_features=draw(u64) if v3 else 0,
        refcount_order=draw(refcount_orders) if v3 else 4,
        header_length=112 if v3 else 72,
        compression_type=draw(st.integers(0, 1)) if v3 else 0,
        with_feature_table=draw(st.booleans() if feature_table is None else feature_table),
    )


FIELDS = (
    "version",
    "backing_file_offset",
    "backing_file_size",
    "cluster_bits",
    "size",
    "crypt_method",
    "l1_size",
    "l1_table_offset",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
    "incompatible_features",
    "compatible_features",
    "autoclear_features",
    "refcount_order",
    "header_length",
    "compression_type",
    "backing_file",
    "backing_format",
)
"""The fields of a :class:`Header` the image holds: a pack and unpack keeps them."""


@FAST
@given(headers(), st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_pack_then_parse_round_trips(header: Header, backing: str | None, fmt: str | None) -> None:
    header.set_backing(backing, fmt)
    data = header.pack()
    assume(len(data) <= header.cluster_size)
    parsed = Header.unpack(data + bytes(header.cluster_size - len(data)))
    assert {f: getattr(parsed, f) for f in FIELDS} == {f: getattr(header, f) for f in FIELDS}
    assert {e.type for e in parsed.extensions} <= {EXT_BACKING_FORMAT, EXT_FEATURE_TABLE}


@FAST
@given(headers(), names, st.one_of(st.none(), names))
def test_the_backing_name_lies_right_after_the_extensions(
    header: Header, backing: str, fmt: str | None
) -> None:
    header.set_backing(backing, fmt)
    data = header.pack()
    assert data[header.backing_file_offset :] == backing.encode()
    end = HeaderExtension.unpack(data, header.backing_file_offset - 8, len(data))
    assert end == HeaderExtension(EXT_END)
    assert header.backing_file_size == len(backing.encode())


@FAST
@given(headers(), st.one_of(st.none(), names), names)
def test_without_a_backing_file_no_backing_format_is_kept(
    header: Header, backing: str | None, fmt: str
) -> None:
    header.set_backing(backing, fmt)
    header.set_backing(None, fmt)
    assert (header.backing_file, header.backing_format) == (None, None)
    assert (header.backing_file_offset, header.backing_file_size) == (0, 0)


@FAST
@given(headers(), st.one_of(st.none(), names), st.binary(max_size=40))
def test_a_new_backing_name_keeps_extensions_blkfs_does_not_know(
    header: Header, backing: str | None, payload: bytes
) -> None:
    """Rewriting the header (a job's new backing file) must not drop, say, the bitmaps
    extension QEMU wrote."""
    unknown = HeaderExtension(0x12345678, payload)
    header.extensions.append(unknown)
    header.set_backing(backing, None)
    data = header.pack()
    assume(len(data) <= header.cluster_size)
    parsed = Header.unpack(data + bytes(header.cluster_size - len(data)))
    assert unknown in parsed.extensions
    assert parsed.backing_file == backing


@FAST
@given(headers(versions=(3,), feature_table=st.just(True)))
def test_v3_feature_table_names_the_known_bits(header: Header) -> None:
    assume(len(header.pack()) <= header.cluster_size)
    parsed = Header.unpack(header.pack())
    assert parsed.feature_names[(0, 4)] == "extended L2 entries"
    assert parsed.feature_names[(1, 0)] == "lazy refcounts"


def _parses_or_format_error(data: bytes) -> None:
    try:
        header = Header.unpack(data)
    except FormatError:
        return
    assert header.version in (2, 3)
    assert 9 <= header.cluster_bits <= 21


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_header_unpack_only_raises_format_error_on_arbitrary_bytes(data: bytes) -> None:
    _parses_or_format_error(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_header_unpack_only_raises_format_error_after_the_magic(tail: bytes) -> None:
    _parses_or_format_error(MAGIC + tail)


@st.composite
def damaged_images(draw: st.DrawFn) -> bytes:
    """A real header start with fields and bytes overwritten, so parsing gets deep."""
    header = draw(headers())
    backing = draw(st.one_of(st.none(), names))
    header.set_backing(backing, draw(st.one_of(st.none(), names)))
    data = bytearray(header.pack())
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
    cut = draw(st.integers(0, len(data) + 64))
    return bytes(data[:cut]) + bytes(max(0, cut - len(data)))


@settings(max_examples=200, deadline=None)
@given(damaged_images())
def test_header_unpack_only_raises_format_error_on_damaged_headers(data: bytes) -> None:
    _parses_or_format_error(data)


@FAST
@given(headers(), st.integers(MAX_BACKING_NAME + 1, 4000))
def test_a_backing_name_over_1023_bytes_is_refused(header: Header, length: int) -> None:
    header.set_backing("b" * length, None)
    data = header.pack()
    with pytest.raises(FormatError):
        Header.unpack(data + bytes(max(0, header.cluster_size - len(data))))


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
    case: tuple[int, bytearray], data: st.DataObject
) -> None:
    order, block = case
    count = refcount_entries(9, order) * len(block) // 512
    index = data.draw(st.integers(0, count - 1), label="index")
    value = data.draw(st.integers(0, (1 << (1 << order)) - 1), label="value")
    before = [get_refcount(block, i, order) for i in range(count)]
    set_refcount(block, index, order, value)
    after = [get_refcount(block, i, order) for i in range(count)]
    assert after[index] == value
    assert after[:index] + after[index + 1 :] == before[:index] + before[index + 1 :]


@FAST
@given(refcount_orders, st.data())
def test_refcounts_pack_like_qemu(order: int, data: st.DataObject) -> None:
    """Byte-wide and wider: big-endian. Narrower: entry 0 in the lowest bits of byte 0."""
    bits = 1 << order
    values = data.draw(
        st.lists(st.integers(0, (1 << bits) - 1), min_size=64 // bits * 8, max_size=64 // bits * 8)
    )
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
@given(
    refcount_orders,
    st.integers(0, 15),
    st.one_of(st.integers(max_value=-1), st.integers(min_value=1 << 64)),
)
def test_a_refcount_that_does_not_fit_is_refused_and_changes_nothing(
    order: int, index: int, value: int
) -> None:
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
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"refcount_bits={refcount_bits},cluster_size=512",
            str(image),
            "3M",
        ],
        check=True,
    )
    data = image.read_bytes()
    header = Header.unpack(data[:512])
    table = header.refcount_table_offset
    block_offset = int.from_bytes(data[table : table + 8], "big")
    block = data[block_offset : block_offset + 512]
    order = header.refcount_order
    counts = [get_refcount(block, i, order) for i in range(refcount_entries(9, order))]
    assert counts[:5] == [1] * 5
    assert not any(counts[5:])


# -- the other structures -------------------------------------------------------------------


@FAST
@given(u32, st.binary(max_size=100), st.binary(max_size=16))
def test_a_header_extension_round_trips_padded_to_8_bytes(
    kind: int, data: bytes, after: bytes
) -> None:
    assume(kind != EXT_END)
    extension = HeaderExtension(kind, data)
    packed = extension.pack()
    assert len(packed) == extension.size and extension.size % 8 == 0
    assert HeaderExtension.unpack(packed + after, 0, len(packed + after)) == extension
    with pytest.raises(FormatError):
        HeaderExtension.unpack(packed, 0, len(packed) - (-len(data) % 8) - 1)


@FAST
@given(st.sampled_from([0, 1, 2]), u8, st.text(st.characters(codec="ascii"), max_size=46))
def test_a_feature_name_entry_round_trips(kind: int, bit: int, name: str) -> None:
    name = name.rstrip("\0")
    feature = Feature(kind, bit, name)
    assert len(feature.pack()) == 48
    assert Feature.unpack(feature.pack()) == feature
    assert Feature.unpack_table(feature.pack() * 3 + b"\0" * 47) == [feature] * 3


@FAST
@given(u32, u32, u64, u64)
def test_the_bitmaps_extension_round_trips(
    count: int, reserved: int, size: int, offset: int
) -> None:
    extension = BitmapsExtension(count, reserved, size, offset)
    assert BitmapsExtension.unpack(extension.pack()) == extension
    with pytest.raises(FormatError):
        BitmapsExtension.unpack(extension.pack()[:-1])


@FAST
@given(u64, u64)
def test_the_crypto_extension_round_trips(offset: int, length: int) -> None:
    extension = CryptoExtension(offset, length)
    assert CryptoExtension.unpack(extension.pack()) == extension
    with pytest.raises(FormatError):
        CryptoExtension.unpack(extension.pack()[:15])


@FAST
@given(st.builds(SnapshotHeader, u64, u32, u16, u16, u32, u32, u64, u32, u32), st.binary())
def test_a_snapshot_table_entry_round_trips(entry: SnapshotHeader, after: bytes) -> None:
    packed = entry.pack()
    assert len(packed) == 40
    assert SnapshotHeader.unpack(bytes(8) + packed + after, 8) == entry
    assert entry.entry_size % 8 == 0
    assert (
        0
        <= entry.entry_size - (40 + entry.extra_data_size + entry.id_str_size + entry.name_size)
        < 8
    )
    with pytest.raises(FormatError):
        SnapshotHeader.unpack(packed[:39])


@FAST
@given(st.builds(BitmapDirEntry, u64, u32, u32, u8, u8, u16, u32), st.binary())
def test_a_bitmap_directory_entry_round_trips(entry: BitmapDirEntry, after: bytes) -> None:
    packed = entry.pack()
    assert len(packed) == 24
    assert BitmapDirEntry.unpack(packed + after) == entry
    assert entry.entry_size % 8 == 0
    with pytest.raises(FormatError):
        BitmapDirEntry.unpack(packed[:23])


@FAST
@given(st.lists(u64, max_size=64))
def test_tables_are_big_endian_64_bit_entries(entries: list[int]) -> None:
    table = array("Q", entries)
    data = encode_table(table)
    assert data == b"".join(encode_entry(e) for e in entries)
    assert decode_table(data) == table
    assert list(table) == entries  # encoding leaves the table as it was


@FAST
@given(headers(), st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_the_version_2_fields_pack_back_to_the_bytes_they_came_from(
    header: Header, backing: str | None, fmt: str | None
) -> None:
    """What an open image rewrites of its header (the v2 fields) is byte-for-byte what it
    read."""
    header.set_backing(backing, fmt)
    data = header.pack()
    assume(len(data) <= header.cluster_size)
    assert Header.unpack(data).pack()[:72] == data[:72]


@needs_qemu
def test_the_feature_table_names_what_qemu_img_names(tmp_path: Path) -> None:
    image = tmp_path / "f.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    header = Header.unpack(image.read_bytes()[:65536])
    table = next(e for e in header.extensions if e.type == EXT_FEATURE_TABLE)
    assert set(Feature.unpack_table(table.data)) == set(KNOWN_FEATURES)
