"""The bitmap directory (spec: "Bitmaps extension", "Bitmap directory"), parsed and packed.

A directory is ``nb_bitmaps`` entries, each the fixed :class:`~.ondisk.BitmapDirEntry`, its
extra data, its name, and padding to 8 bytes. Pure: no I/O; :func:`parse` raises
:class:`~.ondisk.FormatError` for anything malformed or hostile.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ondisk import BitmapDirEntry, FormatError

FLAG_IN_USE = 1 << 0
"""The bitmap may be inconsistent: its image is open for writing, or was not closed cleanly."""
FLAG_AUTO = 1 << 1
"""The bitmap records writes (QEMU's "enabled")."""
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
"""Its extra data may be ignored by a program that does not know it."""
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_BITMAPS = 65535  # QEMU's QCOW2_MAX_BITMAPS
MAX_DIRECTORY_SIZE = 64 << 20  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_NAME = 1023
TABLE_ALL_ONES = 1
"""A bitmap table entry with no data cluster that reads as all ones."""


@dataclass(frozen=True)
class StoredBitmap:
    """One directory entry: the fixed part, its extra data and its name."""

    entry: BitmapDirEntry
    extra: bytes
    name: str

    @property
    def granularity(self) -> int:
        return 1 << self.entry.granularity_bits

    def with_flags(self, flags: int) -> StoredBitmap:
        e = self.entry
        return StoredBitmap(
            BitmapDirEntry(
                e.bitmap_table_offset,
                e.bitmap_table_size,
                flags,
                e.type,
                e.granularity_bits,
                e.name_size,
                e.extra_data_size,
            ),
            self.extra,
            self.name,
        )


def table_size(size: int, granularity: int, cluster_size: int) -> int:
    """Entries of the bitmap table of a ``size`` byte image: one per data cluster, each of
    which holds ``cluster_size * 8`` bits."""
    chunks = -(-size // granularity)
    return -(-chunks // (cluster_size * 8))


def parse(data: bytes | bytearray, count: int) -> list[StoredBitmap]:
    """The ``count`` entries of a directory; FormatError if they do not fit, or if a name
    repeats or is not UTF-8."""
    bitmaps: list[StoredBitmap] = []
    position = 0
    for _ in range(count):
        entry = BitmapDirEntry.unpack(data, position)
        start = position + BitmapDirEntry.STRUCT.size
        end = start + entry.extra_data_size + entry.name_size
        if position + entry.entry_size > len(data):
            raise FormatError("bitmap directory entry runs past the directory")
        if not 0 < entry.name_size <= MAX_NAME:
            raise FormatError(f"bitmap name of {entry.name_size} bytes")
        try:
            name = bytes(data[start + entry.extra_data_size : end]).decode()
        except UnicodeDecodeError:
            raise FormatError("bitmap name is not valid UTF-8") from None
        if any(b.name == name for b in bitmaps):
            raise FormatError(f"bitmap name '{name}' repeats")
        bitmaps.append(
            StoredBitmap(entry, bytes(data[start : start + entry.extra_data_size]), name)
        )
        position += entry.entry_size
    if position != len(data):
        raise FormatError(
            f"bitmap directory of {len(data)} bytes holds {position} bytes of entries"
        )
    return bitmaps


def pack(bitmaps: list[StoredBitmap]) -> bytes:
    out = bytearray()
    for bitmap in bitmaps:
        out += bitmap.entry.pack() + bitmap.extra + bitmap.name.encode()
        out += bytes(-len(out) % 8)
    return bytes(out)


def new_entry(
    name: str, table_offset: int, table_entries: int, granularity: int, enabled: bool
) -> StoredBitmap:
    """The entry of a bitmap blkfs stores: dirty tracking, no extra data."""
    encoded = name.encode()
    return StoredBitmap(
        BitmapDirEntry(
            table_offset,
            table_entries,
            FLAG_AUTO if enabled else 0,
            TYPE_DIRTY_TRACKING,
            granularity.bit_length() - 1,
            len(encoded),
            0,
        ),
        b"",
        name,
    )
