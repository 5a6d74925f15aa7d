"""Dirty bitmaps (QEMU's BdrvDirtyBitmap): which parts of a node were written since a point.

A bitmap covers its node's size in chunks of ``granularity`` bytes (a power of two, 512 B to
2 GiB, as QEMU's), one bit each, packed as QEMU serialises them (bit ``i`` of the bitmap is bit
``i % 8`` of byte ``i // 8``), so a persistent bitmap's on-disk data is its bytes as they are.
Every write, write-zeroes and discard that reaches the node marks the bitmaps it has that are
recording (see :class:`~blkfs.block.node.Node`); a chunk the request touches even in part is
marked whole.

A bitmap may be ``inconsistent``: a persistent bitmap found in use when its image was opened
(its image was not closed cleanly, so writes may have missed it). Such a bitmap is kept so that
users see it, but it neither records nor may be used; it can only be removed (QEMU's rule).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from blkfs.errors import BlockError

if TYPE_CHECKING:
    from blkfs.block.node import Node

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
DEFAULT_GRANULARITY = 64 << 10
MAX_NAME = 1023
"""As QEMU's BDRV_BITMAP_MAX_NAME_SIZE (a qcow2 bitmap name's limit)."""

_SET = re.compile(b"[^\x00]")
_CLEAR = re.compile(b"[^\xff]")


def _fill(bits: bytearray, start: int, end: int, value: bool) -> None:
    """Set (or clear) bits ``start`` to ``end`` (exclusive) of ``bits``."""
    while start < end and start % 8:
        _bit(bits, start, value)
        start += 1
    whole = end - end % 8
    if start < whole:
        bits[start // 8 : whole // 8] = (b"\xff" if value else b"\x00") * ((whole - start) // 8)
        start = whole
    while start < end:
        _bit(bits, start, value)
        start += 1


def _bit(bits: bytearray, index: int, value: bool) -> None:
    if value:
        bits[index // 8] |= 1 << index % 8
    else:
        bits[index // 8] &= ~(1 << index % 8) & 0xFF


def _next(bits: bytes | bytearray, start: int, end: int, value: bool) -> int:
    """The first bit from ``start`` (before ``end``) that has ``value``; ``end`` if none."""
    while start < end and start % 8:
        if bool(bits[start // 8] >> start % 8 & 1) is value:
            return start
        start += 1
    if start >= end:
        return end
    found = (_SET if value else _CLEAR).search(bits, start // 8, -(-end // 8))
    if found is None:
        return end
    byte = found.start()
    position = byte * 8
    while position < end and bool(bits[byte] >> position % 8 & 1) is not value:
        position += 1
    return min(position, end)


def check_granularity(granularity: int) -> None:
    if (
        granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise BlockError(
            errno.EINVAL,
            f"granularity must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY} "
            f"(got {granularity})",
        )


class DirtyBitmap:
    """One bitmap: its name, granularity, flags and bits."""

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        persistent: bool = False,
        enabled: bool = True,
        inconsistent: bool = False,
        bits: bytes | bytearray | None = None,
    ) -> None:
        check_granularity(granularity)
        self.name = name
        self.granularity = granularity
        self.persistent = persistent
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.busy = False
        """A job or an export uses the bitmap: it may not be changed or removed."""
        self.size = size
        self.bits = bytearray(self._bytes_for(size))
        if bits is not None:
            self.bits[:] = bits[: len(self.bits)].ljust(len(self.bits), b"\x00")
            self._clip()

    def _bytes_for(self, size: int) -> int:
        return -(-self.chunks_for(size) // 8)

    def chunks_for(self, size: int) -> int:
        return -(-size // self.granularity)

    def _clip(self) -> None:
        """Bits past the last chunk stay clear (so counts and serialised data are exact)."""
        chunks = self.chunks_for(self.size)
        if chunks % 8:
            self.bits[-1] &= (1 << chunks % 8) - 1

    @property
    def recording(self) -> bool:
        return self.enabled and not self.inconsistent

    def mark(self, offset: int, length: int) -> None:
        """Mark the chunks that ``offset``..+``length`` touches."""
        if length <= 0:
            return
        end = min(offset + length, self.size)
        if offset < end:
            _fill(self.bits, offset // self.granularity, -(-end // self.granularity), True)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def merge(self, other: DirtyBitmap) -> None:
        """Mark what ``other`` has marked (QEMU's block-dirty-bitmap-merge), whatever the
        two granularities."""
        if other.granularity == self.granularity and other.size == self.size:
            merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        for start, length in other.dirty_extents(0, other.size):
            self.mark(start, length)

    def resize(self, size: int) -> None:
        """The node's new size: chunks past it are dropped, new chunks are clean."""
        self.bits = self.bits[: self._bytes_for(size)].ljust(self._bytes_for(size), b"\x00")
        self.size = size
        self._clip()

    def is_dirty(self, offset: int) -> bool:
        index = offset // self.granularity
        return bool(self.bits[index // 8] >> index % 8 & 1)

    def extent(self, offset: int, length: int) -> tuple[int, bool]:
        """How many bytes from ``offset`` (at most ``length``) share the dirty state of
        ``offset``, and that state."""
        end = min(offset + length, self.size)
        dirty = self.is_dirty(offset)
        last = -(-end // self.granularity)
        flip = _next(self.bits, offset // self.granularity + 1, last, not dirty)
        return min(flip * self.granularity, end) - offset, dirty

    def dirty_extents(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The dirty runs of the range, as (offset, length), clipped to it."""
        end = min(offset + length, self.size)
        while offset < end:
            span, dirty = self.extent(offset, end - offset)
            if dirty:
                yield offset, span
            offset += span

    def count(self) -> int:
        """Bytes marked dirty (whole chunks; the last one only as far as the node goes)."""
        chunks = sum(byte.bit_count() for byte in self.bits)
        last = self.chunks_for(self.size) - 1
        if chunks and self.is_dirty(last * self.granularity):
            return (chunks - 1) * self.granularity + self.size - last * self.granularity
        return chunks * self.granularity

    def info(self) -> dict[str, object]:
        """As QEMU's query-block lists it (BlockDirtyInfo)."""
        return {
            "name": self.name,
            "count": self.count(),
            "granularity": self.granularity,
            "recording": self.recording,
            "busy": self.busy,
            "persistent": self.persistent,
            **({"inconsistent": True} if self.inconsistent else {}),
        }


def check_usable(bitmap: DirtyBitmap, node: str, read_only: bool, changing: bool) -> None:
    """Raise unless ``bitmap`` of ``node`` may be used (and, with ``changing``, changed):
    QEMU's rules (an inconsistent bitmap only removed, a busy one not changed, a persistent
    one of a read-only node not changed)."""
    if bitmap.inconsistent:
        raise BlockError(
            errno.EINVAL,
            f"bitmap '{bitmap.name}' of node '{node}' is inconsistent (its image was not "
            "closed cleanly) and cannot be used; remove it",
        )
    if changing and bitmap.busy:
        raise BlockError(errno.EBUSY, f"bitmap '{bitmap.name}' is in use by a job or export")
    if changing and bitmap.persistent and read_only:
        raise BlockError(
            errno.EROFS, f"bitmap '{bitmap.name}' is persistent and node '{node}' read-only"
        )


def find_below(node: Node, name: str) -> tuple[Node, DirtyBitmap]:
    """The bitmap ``name`` on ``node`` or, as QEMU looks for an export's bitmap, down its
    filters and backing chain; and the node that has it."""
    at: Node | None = node
    while at is not None:
        found = at.bitmaps.by_name.get(name)
        if found is not None:
            return at, found
        edge = at.driver.filtered if at.driver.is_filter else at.children.get("backing")
        at = edge.node if edge is not None else None
    raise BlockError(
        errno.ENOENT, f"no dirty bitmap named '{name}' on node '{node.name}' or below it"
    )


class DirtyBitmaps:
    """A node's bitmaps by name, and the marking every change of the node does."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self.by_name: dict[str, DirtyBitmap] = {}
        self._recording: tuple[DirtyBitmap, ...] = ()

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)

    def changed(self) -> None:
        """A bitmap was added, removed, enabled or disabled: which ones record."""
        self._recording = tuple(b for b in self.by_name.values() if b.recording)

    def mark(self, offset: int, length: int) -> None:
        for bitmap in self._recording:
            bitmap.mark(offset, length)

    def find(self, name: str) -> DirtyBitmap:
        bitmap = self.by_name.get(name)
        if bitmap is None:
            raise BlockError(
                errno.ENOENT, f"node '{self.node_name}' has no dirty bitmap named '{name}'"
            )
        return bitmap

    def add(self, bitmap: DirtyBitmap) -> None:
        if not bitmap.name or len(bitmap.name.encode()) > MAX_NAME:
            raise BlockError(
                errno.EINVAL, f"a bitmap name is 1 to {MAX_NAME} bytes (got {bitmap.name!r})"
            )
        if bitmap.name in self.by_name:
            raise BlockError(
                errno.EEXIST,
                f"node '{self.node_name}' has a dirty bitmap named '{bitmap.name}' already",
            )
        self.by_name[bitmap.name] = bitmap
        self.changed()

    def remove(self, name: str) -> DirtyBitmap:
        bitmap = self.find(name)
        del self.by_name[name]
        self.changed()
        return bitmap

    def resize(self, size: int) -> None:
        for bitmap in self.by_name.values():
            bitmap.resize(size)

    def info(self) -> list[dict[str, object]]:
        return [bitmap.info() for bitmap in self.by_name.values()]
