"""qcow2 on-disk structures, declared once with the spec's names.

Reference: QEMU docs/interop/qcow2.txt ("QCOW2 Image Format"). Everything here is a function
of bytes and values; the driver does the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes: magic .. snapshots_offset
V3_FIELDS = struct.Struct(">QQQII")            # incompatible .. header_length, at 72
V3_HEADER_LENGTH = 112                         # with compression_type and padding
EXTENSION = struct.Struct(">II")

# Header extension types (spec: "Header extensions").
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0

INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20        # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20   # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023


class FormatError(ValueError):
    """The bytes are not a qcow2 image blkfs can open; the message says what is wrong."""


@dataclass
class Header:
    """The qcow2 header (spec: "Header"), v2 fields then v3 additions."""

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
    header_length: int = 72
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    unknown_extensions: list[int] = field(default_factory=list)
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
        """The header, extensions and backing file name, as they start the image."""
        out = bytearray(V2_HEADER.pack(
            MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size,
            self.l1_table_offset, self.refcount_table_offset, self.refcount_table_clusters,
            self.nb_snapshots, self.snapshots_offset))
        if self.version >= 3:
            out += V3_FIELDS.pack(self.incompatible_features, self.compatible_features,
                                  self.autoclear_features, self.refcount_order,
                                  V3_HEADER_LENGTH)
            out += bytes([self.compression_type]) + bytes(7)
        if self.backing_format:
            out += _extension(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.version >= 3 and self.with_feature_table:
            out += _extension(EXT_FEATURE_TABLE, feature_table())
        out += EXTENSION.pack(EXT_END, 0)
        return bytes(out)

    def with_backing(self, name: str | None, fmt: str | None) -> Header:
        """This header naming a backing file; the name is stored after the extensions."""
        header = replace(self, backing_file=name, backing_format=fmt if name else None,
                         backing_file_offset=0, backing_file_size=0)
        if name:
            encoded = name.encode()
            header.backing_file_offset = len(header.pack())
            header.backing_file_size = len(encoded)
        return header


def _extension(kind: int, data: bytes) -> bytes:
    padded = data + bytes(-len(data) % 8)
    return EXTENSION.pack(kind, len(data)) + padded


def feature_table() -> bytes:
    """The feature name table QEMU writes, so tools can name the bits."""
    entries = [(0, bit, name) for bit, name in INCOMPAT_NAMES.items()]
    entries += [(1, bit, name) for bit, name in COMPAT_NAMES.items()]
    entries += [(2, bit, name) for bit, name in AUTOCLEAR_NAMES.items()]
    return b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in entries)


def parse_header(data: bytes) -> Header:
    """Parse the first cluster of an image; FormatError for anything malformed or hostile."""
    if data[:4] != MAGIC:
        raise FormatError("not a qcow2 image (bad magic)")
    if len(data) < V2_HEADER.size:
        raise FormatError(f"truncated header ({len(data)} of {V2_HEADER.size} bytes)")
    fields = V2_HEADER.unpack_from(data)
    header = Header(*fields[1:])
    if header.version not in (2, 3):
        raise FormatError(f"unsupported qcow2 version {header.version}")
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"cluster_bits {header.cluster_bits} is outside 9..21")
    if header.version == 3:
        if len(data) < 104:
            raise FormatError("truncated v3 header")
        (header.incompatible_features, header.compatible_features, header.autoclear_features,
         header.refcount_order, header.header_length) = V3_FIELDS.unpack_from(data, 72)
        if header.header_length < 104 or header.header_length > min(len(data),
                                                                    header.cluster_size):
            raise FormatError(f"invalid header_length {header.header_length}")
        if header.header_length > 104:
            header.compression_type = data[104]
    if header.refcount_order > 6:
        raise FormatError(f"refcount_order {header.refcount_order} is over 6 (64 bits)")
    if header.compression_type not in COMPRESSION_NAMES:
        raise FormatError(f"unknown compression type {header.compression_type}")
    _parse_extensions(header, data)
    if header.backing_file_offset:
        start, length = header.backing_file_offset, header.backing_file_size
        if length > MAX_BACKING_NAME or start + length > min(len(data), header.cluster_size):
            raise FormatError("backing file name lies outside the first cluster")
        try:
            header.backing_file = data[start:start + length].decode()
        except UnicodeDecodeError:
            raise FormatError("backing file name is not valid UTF-8") from None
    return header


def _parse_extensions(header: Header, data: bytes) -> None:
    offset = header.header_length if header.version == 3 else V2_HEADER.size
    end = min(len(data), header.cluster_size)
    while offset + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(data, offset)
        offset += EXTENSION.size
        if kind == EXT_END:
            return
        if offset + length > end:
            raise FormatError(f"header extension 0x{kind:08x} runs past the first cluster")
        body = data[offset:offset + length]
        if kind == EXT_BACKING_FORMAT:
            header.backing_format = body.decode(errors="replace")
        elif kind == EXT_FEATURE_TABLE:
            for i in range(0, len(body) - 47, 48):
                kind_, bit, name = struct.unpack_from(">BB46s", body, i)
                header.feature_names[(kind_, bit)] = name.rstrip(b"\0").decode(errors="replace")
        else:
            header.unknown_extensions.append(kind)
        offset += length + (-length % 8)


def feature_list(header: Header) -> list[str]:
    """Names of the feature bits set, using the image's own table where it has one."""
    names = []
    for kind, bits, known in ((0, header.incompatible_features, INCOMPAT_NAMES),
                              (1, header.compatible_features, COMPAT_NAMES),
                              (2, header.autoclear_features, AUTOCLEAR_NAMES)):
        for bit in range(64):
            if bits >> bit & 1:
                names.append(header.feature_names.get((kind, bit),
                                                      known.get(bit, f"unknown bit {bit}")))
    return names
