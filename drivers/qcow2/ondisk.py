"""qcow2 on-disk structures, each declared once with QEMU's names, packed and unpacked here.

Reference: QEMU docs/interop/qcow2.txt ("QCOW2 Image Format") and block/qcow2.h, whose struct
names each class gives. Ground rules:

* Everything here is a function of bytes and values; the driver, the check and create do the
  I/O and use these classes for every byte of these structures they read or write.
* Each structure has one ``pack`` and one ``unpack``. ``unpack`` raises :class:`FormatError`
  for bytes that are malformed or hostile, and nothing else.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import ClassVar

MAGIC = b"QFI\xfb"

# Header extension types (spec: "Header extensions").
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Feature bits (spec: "incompatible_features", "compatible_features", "autoclear_features").
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS

V2_HEADER_LENGTH = 72
"""Bytes of the version 2 header: every field an open image changes (size, the L1 table and
the refcount table) lies in them."""
AUTOCLEAR_OFFSET = V2_HEADER_LENGTH + 16
"""Where autoclear_features lies in a version 3 header: eight bytes a disk writes whole."""
V3_HEADER_LENGTH = 112
"""What blkfs writes: the version 3 fields, compression_type and padding."""
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # magic .. snapshots_offset
_HEADER_V3 = struct.Struct(">QQQII")  # incompatible_features .. header_length, at 72
_V3_FIELDS_END = V2_HEADER_LENGTH + _HEADER_V3.size  # 104: compression_type follows

BIG_ENDIAN = sys.byteorder == "big"


class FormatError(ValueError):
    """The bytes are not a qcow2 image blkfs can open; the message says what is wrong."""


def _padded(length: int) -> int:
    """Spec: header extensions, snapshot and bitmap directory entries end on 8 bytes."""
    return length + (-length % 8)


# -- header extensions ----------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderExtension:
    """One header extension (QEMU's QCowExtension: magic, len) and its data."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">II")

    type: int
    data: bytes = b""

    @property
    def size(self) -> int:
        """Bytes it takes in the header, padding included."""
        return self.STRUCT.size + _padded(len(self.data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.type, len(self.data)) + self.data + bytes(-len(self.data) % 8)

    @classmethod
    def unpack(cls, data: bytes, offset: int, end: int) -> HeaderExtension:
        """The extension at ``offset``, which must end by ``end`` (the first cluster)."""
        if offset + cls.STRUCT.size > end:
            raise FormatError("header extensions run past the first cluster")
        kind, length = cls.STRUCT.unpack_from(data, offset)
        if kind == EXT_END:
            return cls(EXT_END)
        start = offset + cls.STRUCT.size
        if start + length > end:
            raise FormatError(f"header extension 0x{kind:08x} runs past the first cluster")
        return cls(kind, bytes(data[start : start + length]))


@dataclass(frozen=True)
class Feature:
    """One entry of the feature name table extension (QEMU's Qcow2Feature)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">BB46s")
    INCOMPATIBLE: ClassVar[int] = 0
    COMPATIBLE: ClassVar[int] = 1
    AUTOCLEAR: ClassVar[int] = 2

    type: int
    bit: int
    name: str

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.type, self.bit, self.name.encode())

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Feature:
        kind, bit, name = cls.STRUCT.unpack_from(data, offset)
        return cls(kind, bit, name.rstrip(b"\0").decode(errors="replace"))

    @classmethod
    def unpack_table(cls, data: bytes) -> list[Feature]:
        """Every whole entry of a feature name table extension's data."""
        return [
            cls.unpack(data, offset)
            for offset in range(0, len(data) - cls.STRUCT.size + 1, cls.STRUCT.size)
        ]


KNOWN_FEATURES = tuple(
    [Feature(Feature.INCOMPATIBLE, bit, name) for bit, name in INCOMPAT_NAMES.items()]
    + [Feature(Feature.COMPATIBLE, bit, name) for bit, name in COMPAT_NAMES.items()]
    + [Feature(Feature.AUTOCLEAR, bit, name) for bit, name in AUTOCLEAR_NAMES.items()]
)
"""The feature name table QEMU writes, so tools can name the bits."""


@dataclass(frozen=True)
class BitmapsExtension:
    """The bitmaps extension's data (QEMU's Qcow2BitmapHeaderExt)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">IIQQ")

    nb_bitmaps: int
    reserved32: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.nb_bitmaps,
            self.reserved32,
            self.bitmap_directory_size,
            self.bitmap_directory_offset,
        )

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension:
        if len(data) < cls.STRUCT.size:
            raise FormatError(f"bitmaps extension of {len(data)} bytes is too short")
        return cls(*cls.STRUCT.unpack_from(data))


@dataclass(frozen=True)
class CryptoExtension:
    """The full disk encryption header extension's data (QEMU's Qcow2CryptoHeaderExtension):
    where the crypto header lies."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QQ")

    offset: int
    length: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.offset, self.length)

    @classmethod
    def unpack(cls, data: bytes) -> CryptoExtension:
        if len(data) < cls.STRUCT.size:
            raise FormatError(f"crypto extension of {len(data)} bytes is too short")
        return cls(*cls.STRUCT.unpack_from(data))


# -- the header -----------------------------------------------------------------------------


@dataclass
class Header:
    """The qcow2 header (QEMU's QCowHeader: version 2 fields, then version 3 additions) with
    what QEMU reads alongside it: the header extensions and the backing file name.

    :meth:`pack` writes the backing format and (for version 3) feature name table extensions
    from the fields; :meth:`unpack` keeps every extension it finds, in order, in
    ``extensions``."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    """(feature type, bit) -> name, from the image's feature name table."""
    extensions: list[HeaderExtension] = field(default_factory=list)
    """The header extensions as unpacked, in the order of the image."""
    with_feature_table: bool = True
    """Write the feature name table (left out where it does not fit in a small cluster)."""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    def pack(self) -> bytes:
        """The header, its extensions and the backing file name, as they start the image."""
        return self._pack_header() + (self.backing_file or "").encode()

    def _pack_header(self) -> bytes:
        out = bytearray(
            _HEADER_V2.pack(
                MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        )
        if self.version >= 3:
            out += _HEADER_V3.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                V3_HEADER_LENGTH,
            )
            out += bytes([self.compression_type]) + bytes(V3_HEADER_LENGTH - _V3_FIELDS_END - 1)
        if self.backing_format:
            out += HeaderExtension(EXT_BACKING_FORMAT, self.backing_format.encode()).pack()
        for extension in self.extensions:  # what the image had that pack does not write
            if extension.type not in (EXT_BACKING_FORMAT, EXT_FEATURE_TABLE):
                out += extension.pack()
        if self.version >= 3 and self.with_feature_table:
            out += HeaderExtension(
                EXT_FEATURE_TABLE, b"".join(f.pack() for f in KNOWN_FEATURES)
            ).pack()
        out += HeaderExtension(EXT_END).pack()
        return bytes(out)

    def pack_cluster(self) -> bytes | None:
        """The first cluster as :meth:`pack` writes it, zero-padded; without the feature
        name table if only that makes it fit (small clusters), None if nothing does. The
        backing file name's offset follows what is left out."""
        for table in (self.with_feature_table, False):
            self.with_feature_table = table
            self.set_backing(self.backing_file, self.backing_format)
            head = self.pack()
            if len(head) <= self.cluster_size:
                return head + bytes(self.cluster_size - len(head))
        return None

    def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Name a backing file (or none); the name is stored after the extensions."""
        self.backing_file, self.backing_format = name, fmt if name else None
        self.backing_file_offset = self.backing_file_size = 0
        if name:
            self.backing_file_offset = len(self._pack_header())
            self.backing_file_size = len(name.encode())

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """The header at the start of ``data`` (the image's first cluster, or as much of it as
        the file has); FormatError for anything malformed or hostile."""
        if data[:4] != MAGIC:
            raise FormatError("not a qcow2 image (bad magic)")
        if len(data) < _HEADER_V2.size:
            raise FormatError(f"truncated header ({len(data)} of {_HEADER_V2.size} bytes)")
        header = cls(*_HEADER_V2.unpack_from(data)[1:])
        if header.version not in (2, 3):
            raise FormatError(f"unsupported qcow2 version {header.version}")
        if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
            raise FormatError(f"cluster_bits {header.cluster_bits} is outside 9..21")
        end = min(len(data), header.cluster_size)
        if header.version == 3:
            if len(data) < _V3_FIELDS_END:
                raise FormatError("truncated v3 header")
            (
                header.incompatible_features,
                header.compatible_features,
                header.autoclear_features,
                header.refcount_order,
                header.header_length,
            ) = _HEADER_V3.unpack_from(data, V2_HEADER_LENGTH)
            if not _V3_FIELDS_END <= header.header_length <= end:
                raise FormatError(f"invalid header_length {header.header_length}")
            if header.header_length > _V3_FIELDS_END:
                header.compression_type = data[_V3_FIELDS_END]
        if header.refcount_order > 6:
            raise FormatError(f"refcount_order {header.refcount_order} is over 6 (64 bits)")
        if header.compression_type not in COMPRESSION_NAMES:
            raise FormatError(f"unknown compression type {header.compression_type}")
        header._unpack_extensions(data, end)
        if header.backing_file_offset:
            start, length = header.backing_file_offset, header.backing_file_size
            if length > MAX_BACKING_NAME or start + length > end:
                raise FormatError("backing file name lies outside the first cluster")
            try:
                header.backing_file = data[start : start + length].decode()
            except UnicodeDecodeError:
                raise FormatError("backing file name is not valid UTF-8") from None
        return header

    def _unpack_extensions(self, data: bytes, end: int) -> None:
        offset = self.header_length if self.version == 3 else V2_HEADER_LENGTH
        while offset + HeaderExtension.STRUCT.size <= end:
            extension = HeaderExtension.unpack(data, offset, end)
            if extension.type == EXT_END:
                return
            self.extensions.append(extension)
            if extension.type == EXT_BACKING_FORMAT:
                self.backing_format = extension.data.decode(errors="replace")
            elif extension.type == EXT_FEATURE_TABLE:
                for feature in Feature.unpack_table(extension.data):
                    self.feature_names[(feature.type, feature.bit)] = feature.name
            offset += extension.size


def feature_list(header: Header) -> list[str]:
    """Names of the feature bits set, using the image's own table where it has one."""
    return [
        header.feature_names.get((kind, bit), known.get(bit, f"unknown bit {bit}"))
        for kind, bits, known in (
            (Feature.INCOMPATIBLE, header.incompatible_features, INCOMPAT_NAMES),
            (Feature.COMPATIBLE, header.compatible_features, COMPAT_NAMES),
            (Feature.AUTOCLEAR, header.autoclear_features, AUTOCLEAR_NAMES),
        )
        for bit in range(64)
        if bits >> bit & 1
    ]


# -- snapshot table and bitmap directory ----------------------------------------------------


@dataclass(frozen=True)
class SnapshotHeader:
    """The fixed part of a snapshot table entry (QEMU's QCowSnapshotHeader); the extra data,
    the ID string and the name follow it, then padding to 8 bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QIHHIIQII")

    l1_table_offset: int
    l1_size: int
    id_str_size: int
    name_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data_size: int

    @property
    def entry_size(self) -> int:
        """Bytes of the whole entry in the snapshot table, padding included."""
        return _padded(self.STRUCT.size + self.extra_data_size + self.id_str_size + self.name_size)

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.l1_table_offset,
            self.l1_size,
            self.id_str_size,
            self.name_size,
            self.date_sec,
            self.date_nsec,
            self.vm_clock_nsec,
            self.vm_state_size,
            self.extra_data_size,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray, offset: int = 0) -> SnapshotHeader:
        if offset + cls.STRUCT.size > len(data):
            raise FormatError("snapshot table entry is truncated")
        return cls(*cls.STRUCT.unpack_from(data, offset))


@dataclass(frozen=True)
class BitmapDirEntry:
    """The fixed part of a bitmap directory entry (QEMU's Qcow2BitmapDirEntry); the extra data
    and the name follow it, then padding to 8 bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct(">QIIBBHI")
    TABLE_OFFSET_MASK: ClassVar[int] = 0x00FFFFFFFFFFFE00
    """Of a bitmap table entry (spec: "Bitmap table")."""

    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name_size: int
    extra_data_size: int

    @property
    def entry_size(self) -> int:
        """Bytes of the whole entry in the directory, padding included."""
        return _padded(self.STRUCT.size + self.extra_data_size + self.name_size)

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.bitmap_table_offset,
            self.bitmap_table_size,
            self.flags,
            self.type,
            self.granularity_bits,
            self.name_size,
            self.extra_data_size,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray, offset: int = 0) -> BitmapDirEntry:
        if offset + cls.STRUCT.size > len(data):
            raise FormatError("bitmap directory entry runs past the directory")
        return cls(*cls.STRUCT.unpack_from(data, offset))


# -- tables of 64-bit entries (L1, L2, refcount table, bitmap table) -------------------------


def decode_table(data: bytes | bytearray) -> array[int]:
    """Big-endian 64-bit entries, as native integers."""
    table = array("Q", data)
    if not BIG_ENDIAN:
        table.byteswap()
    return table


def encode_table(table: array[int]) -> bytes:
    if BIG_ENDIAN:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


def encode_entry(entry: int) -> bytes:
    """One table entry, as an L1 entry is written on its own."""
    return entry.to_bytes(8, "big")


# -- refcount blocks ------------------------------------------------------------------------


def refcount_entries(cluster_bits: int, refcount_order: int) -> int:
    """Refcounts one refcount block holds."""
    return (1 << (cluster_bits + 3)) >> refcount_order


def get_refcount(block: bytes | bytearray | memoryview, index: int, refcount_order: int) -> int:
    """Refcount ``index`` of a refcount block (spec: "Host cluster management")."""
    bits = 1 << refcount_order
    if bits >= 8:
        width = bits // 8
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    per_byte = 8 // bits
    byte = block[index // per_byte]
    shift = (index % per_byte) * bits  # spec: low-order bits first within a byte
    return (byte >> shift) & ((1 << bits) - 1)


def set_refcount(
    block: bytearray | memoryview, index: int, refcount_order: int, value: int
) -> None:
    """Store refcount ``index``; OverflowError (and nothing changes) if it does not fit."""
    bits = 1 << refcount_order
    if value < 0 or value >= 1 << bits:
        raise OverflowError(f"refcount {value} does not fit in {bits} bits")
    if bits >= 8:
        width = bits // 8
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    position = index // per_byte
    block[position] = (block[position] & ~mask) | (value << shift)
