"""Replay of dm-log-writes logs, as QEMU's blklogwrites, blkfs's and Linux's dm-log-writes
write them: parse a log, and say what an image held after a power cut at any point of it.

Ground rules:

* Pure: :func:`parse` and :func:`build` map bytes to entries and back; :func:`crash_state`
  picks the entries a crash may have left on the disk. Applying them is the caller's choice:
  :func:`apply_to` writes them into a bytearray, :func:`apply_to_file` into an open file and
  hands back what undoes it (so one image can be taken through many crash states cheaply).
* The format (reference: Linux drivers/md/dm-log-writes.c, QEMU block/blklogwrites.c): log
  sector 0 holds the super block (magic, version, nr_entries, sectorsize; little-endian); then
  each entry fills one log sector (sector, nr_sectors, flags, data_len, and a mark's text),
  followed by ``nr_sectors`` sectors of data unless it is a discard. ``sector`` and
  ``nr_sectors`` count log sectors. Only the ``nr_entries`` entries the super block counts
  are read, as xfstests' replay-log does.
* The crash model (xfstests' replay-log, CrashMonkey): everything logged up to a flush entry
  is on the disk. Each write or discard logged after the last flush before the crash may have
  reached the disk or not, in any subset; those that did are applied in log order. A FUA
  write is on the disk once logged. A discard reads back as zeros (a punched hole), the
  strictest thing a device may do with it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")
MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK


class LogError(ValueError):
    """The bytes are not a dm-log-writes log (or one cut short); the message says where."""


@dataclass(frozen=True)
class Entry:
    """One logged request. ``data`` is what a write wrote (``nr_sectors`` log sectors; empty
    for a discard, a flush or a mark); ``mark`` is a mark's text."""

    sector: int
    nr_sectors: int
    flags: int = 0
    data: bytes | memoryview = b""
    mark: bytes = b""

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & DISCARD)

    @property
    def changes_data(self) -> bool:
        """A write or a discard: something a crash may keep or lose."""
        return bool(self.nr_sectors) and not self.flags & MARK


@dataclass
class Log:
    sector_size: int
    entries: list[Entry] = field(default_factory=list)

    def extent(self, entry: Entry) -> tuple[int, int]:
        """(byte offset, byte length) of what ``entry`` changes on the device."""
        return entry.sector * self.sector_size, entry.nr_sectors * self.sector_size

    def flush_points(self) -> list[int]:
        """Indices of the flush entries: the states a crash is sure to have reached."""
        return [index for index, entry in enumerate(self.entries) if entry.is_flush]

    def pending(self, upto: int) -> list[int]:
        """Indices of the writes and discards among the first ``upto`` entries that a crash
        right after them may have lost: those after the last flush, except FUA writes."""
        start = self.durable_upto(upto)
        return [
            index
            for index in range(start, upto)
            if self.entries[index].changes_data and not self.entries[index].flags & FUA
        ]

    def durable_upto(self, upto: int) -> int:
        """How many leading entries are surely on the disk after a crash following entry
        ``upto - 1``: everything up to and including the last flush among them."""
        for index in range(upto - 1, -1, -1):
            if self.entries[index].is_flush:
                return index + 1
        return 0


def parse(data: bytes | bytearray | memoryview) -> Log:
    """The log in ``data``; LogError if it is not one. Entry data are views into ``data``.
    A log cut short inside the data of its last entry (a zero write QEMU logged at the end
    of its log with a hole) reads as if the rest were zeros."""
    view = memoryview(data).cast("B")
    if len(view) < SUPER.size:
        raise LogError(f"{len(view)} bytes are too short for a log super block")
    magic, version, count, sector_size = SUPER.unpack_from(view, 0)
    if magic != MAGIC:
        raise LogError(f"bad magic {magic:#x} (want {MAGIC:#x}): not a dm-log-writes log")
    if version != VERSION:
        raise LogError(f"unsupported log version {version}")
    if sector_size < ENTRY.size or sector_size & (sector_size - 1):
        raise LogError(f"invalid log sector size {sector_size}")
    log = Log(sector_size)
    position = sector_size
    for index in range(count):
        if position + ENTRY.size > len(view):
            raise LogError(f"the log ends before entry {index} of {count}")
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(view, position)
        if flags & ~KNOWN_FLAGS:
            raise LogError(f"entry {index}: unknown flags {flags:#x}")
        mark = b""
        if flags & MARK:
            if ENTRY.size + data_len > sector_size:
                raise LogError(f"entry {index}: mark of {data_len} bytes overflows its sector")
            mark = bytes(view[position + ENTRY.size : position + ENTRY.size + data_len])
        position += sector_size
        payload: bytes | memoryview = b""
        if nr_sectors and not flags & DISCARD:
            end = position + nr_sectors * sector_size
            payload = view[position:end]
            if end > len(view):
                if index != count - 1:
                    raise LogError(f"the log ends inside the data of entry {index}")
                payload = bytes(payload) + bytes(end - len(view))
            position = end
        log.entries.append(Entry(sector, nr_sectors, flags, payload, mark))
    return log


def build(sector_size: int, entries: Iterable[Entry]) -> bytes:
    """The log of ``entries``, as blklogwrites writes it (the inverse of :func:`parse`)."""
    parts = [b""]
    count = 0
    for entry in entries:
        has_data = entry.nr_sectors and not entry.flags & DISCARD
        if has_data and len(entry.data) != entry.nr_sectors * sector_size:
            raise ValueError(
                f"entry {count}: {len(entry.data)} bytes of data for "
                f"{entry.nr_sectors} sectors of {sector_size}"
            )
        head = ENTRY.pack(entry.sector, entry.nr_sectors, entry.flags, len(entry.mark))
        head += entry.mark
        if len(head) > sector_size:
            raise ValueError(f"entry {count}: mark too long for a {sector_size}-byte sector")
        parts.append(head + bytes(sector_size - len(head)))
        if has_data:
            parts.append(bytes(entry.data))
        count += 1
    head = SUPER.pack(MAGIC, VERSION, count, sector_size)
    parts[0] = head + bytes(sector_size - len(head))
    return b"".join(parts)


def crash_state(log: Log, upto: int, keep: Collection[int] | None = None) -> list[Entry]:
    """The entries on the disk after a crash that followed entry ``upto - 1``: all up to the
    last flush before it, then of the later writes and discards the FUA writes and those whose
    index is in ``keep`` (all of them if ``keep`` is None), in log order."""
    if not 0 <= upto <= len(log.entries):
        raise ValueError(f"crash point {upto} is outside the log's {len(log.entries)} entries")
    durable = log.durable_upto(upto)
    state = [e for e in log.entries[:durable] if e.changes_data]
    for index in range(durable, upto):
        entry = log.entries[index]
        if entry.changes_data and (keep is None or index in keep or entry.flags & FUA):
            state.append(entry)
    return state


def apply_to(image: bytearray, log: Log, entries: Iterable[Entry]) -> None:
    """Apply ``entries`` to an in-memory image, growing it as a file grows."""
    for entry in entries:
        offset, length = log.extent(entry)
        if offset + length > len(image):
            image.extend(bytes(offset + length - len(image)))
        image[offset : offset + length] = bytes(length) if entry.is_discard else entry.data


Undo = tuple[int, list[tuple[int, bytes]]]
"""The file size before, and the old bytes of every range written (newest first)."""


def apply_to_file(fd: int, log: Log, entries: Sequence[Entry]) -> Undo:
    """Apply ``entries`` to the open file ``fd``; return what :func:`undo` needs to put the
    file back as it was."""
    size = os.fstat(fd).st_size
    saved: list[tuple[int, bytes]] = []
    for entry in entries:
        offset, length = log.extent(entry)
        saved.append((offset, os.pread(fd, length, offset)))
        _pwrite_all(fd, bytes(length) if entry.is_discard else entry.data, offset)
    saved.reverse()
    return size, saved


def undo(fd: int, undo_info: Undo) -> None:
    """Put back a file that :func:`apply_to_file` changed."""
    size, saved = undo_info
    for offset, old in saved:
        _pwrite_all(fd, old, offset)
    os.ftruncate(fd, size)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
