"""The dm-log-writes replay library (tests/logreplay.py) against plain values: a log built
from random requests parses back to them, and replaying it gives what the requests give."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.logreplay import (
    DISCARD,
    FLUSH,
    FUA,
    MARK,
    Entry,
    Log,
    LogError,
    apply_to,
    apply_to_file,
    build,
    crash_state,
    parse,
    undo,
)

SECTORS = 64  # the device, in log sectors

sector_sizes = st.sampled_from((32, 512, 4096))


@st.composite
def logs(draw: st.DrawFn) -> tuple[int, list[Entry]]:
    """A sector size and a list of writes (some FUA), discards, flushes and marks."""
    size = draw(sector_sizes)
    entries = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(("write", "write", "write", "discard", "flush", "mark")))
        if kind == "flush":
            entries.append(Entry(0, 0, FLUSH))
        elif kind == "mark":
            text = draw(st.binary(max_size=size - 32))
            entries.append(Entry(0, 0, MARK, mark=text))
        else:
            sector = draw(st.integers(0, SECTORS - 1))
            count = draw(st.integers(1, SECTORS - sector))
            if kind == "discard":
                entries.append(Entry(sector, count, DISCARD))
            else:
                fill = draw(st.integers(1, 255))
                flags = FUA if draw(st.booleans()) and draw(st.booleans()) else 0
                entries.append(Entry(sector, count, flags, bytes([fill]) * (count * size)))
    return size, entries


def direct(size: int, entries: list[Entry]) -> bytearray:
    """What the requests leave on a device, applied one by one with no log in between."""
    image = bytearray(SECTORS * size)
    for entry in entries:
        start, end = entry.sector * size, (entry.sector + entry.nr_sectors) * size
        if entry.flags & DISCARD:
            image[start:end] = bytes(end - start)
        elif entry.nr_sectors:
            image[start:end] = entry.data
    return image


@settings(max_examples=200, deadline=None)
@given(logs())
def test_a_built_log_parses_back_to_its_entries(log: tuple[int, list[Entry]]) -> None:
    size, entries = log
    parsed = parse(build(size, entries))
    assert parsed.sector_size == size
    assert parsed.entries == entries
    assert parse(build(size, parsed.entries)).entries == entries


@settings(max_examples=200, deadline=None)
@given(logs())
def test_replay_to_the_end_equals_applying_the_writes(log: tuple[int, list[Entry]]) -> None:
    size, entries = log
    parsed = parse(build(size, entries))
    image = bytearray(SECTORS * size)
    apply_to(image, parsed, crash_state(parsed, len(parsed.entries)))
    assert image == direct(size, entries)


@settings(max_examples=200, deadline=None)
@given(logs(), st.data())
def test_a_crash_keeps_what_was_flushed_and_fua_and_a_chosen_subset(
    log: tuple[int, list[Entry]], data: st.DataObject
) -> None:
    size, entries = log
    parsed = parse(build(size, entries))
    upto = data.draw(st.integers(0, len(entries)))
    pending = parsed.pending(upto)
    keep = set(data.draw(st.lists(st.sampled_from(pending), unique=True)) if pending else [])
    flushed = max((i + 1 for i in range(upto) if entries[i].flags & FLUSH), default=0)
    expected = [
        e
        for i, e in enumerate(entries[:upto])
        if e.nr_sectors and not e.flags & MARK and (i < flushed or i in keep or e.flags & FUA)
    ]
    assert crash_state(parsed, upto, keep) == expected
    assert all(i >= flushed and not entries[i].flags & (FLUSH | FUA | MARK) for i in pending)
    assert crash_state(parsed, upto, set()) == crash_state(parsed, flushed) + [
        e for e in entries[flushed:upto] if e.flags & FUA
    ]


@settings(max_examples=100, deadline=None)
@given(logs(), st.data())
def test_applying_to_a_file_and_undoing_leaves_it_as_it_was(
    log: tuple[int, list[Entry]], data: st.DataObject
) -> None:
    size, entries = log
    parsed = parse(build(size, entries))
    before = os.urandom(data.draw(st.integers(0, SECTORS * size)))
    with tempfile.TemporaryFile() as f:
        f.write(before)
        f.flush()
        state = crash_state(parsed, len(entries))
        done = apply_to_file(f.fileno(), parsed, state)
        image = bytearray(before)
        apply_to(image, parsed, state)
        assert os.pread(f.fileno(), len(image) + 1, 0) == image
        undo(f.fileno(), done)
        assert os.pread(f.fileno(), len(before) + 1, 0) == before


def test_only_the_entries_the_super_block_counts_are_read() -> None:
    log = build(512, [Entry(0, 1, 0, b"a" * 512), Entry(0, 0, FLUSH)])
    stale = log + build(512, [Entry(3, 1, 0, b"b" * 512)])[512:]  # an old log's leftovers
    assert parse(stale).entries == parse(log).entries


def test_a_zero_write_cut_short_at_the_end_of_the_log_reads_as_zeros() -> None:
    log = build(512, [Entry(2, 4, 0, bytes(2048))])
    assert parse(log[:-1500]).entries == [Entry(2, 4, 0, bytes(2048))]
    with pytest.raises(LogError, match="ends inside the data of entry 0"):
        parse(build(512, [Entry(2, 4, 0, bytes(2048)), Entry(0, 0, FLUSH)])[:1200])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda log: log[:20], "too short"),
        (lambda log: b"x" + log[1:], "bad magic"),
        (lambda log: log[:8] + (2).to_bytes(8, "little") + log[16:], "version 2"),
        (lambda log: log[:24] + (500).to_bytes(4, "little") + log[28:], "sector size 500"),
        (lambda log: log[:16] + (3).to_bytes(8, "little") + log[24:], "ends before entry 2"),
        (
            lambda log: log[: 512 + 16] + (64).to_bytes(8, "little") + log[512 + 24 :],
            "unknown flags 0x40",
        ),
    ],
)
def test_a_damaged_log_is_refused_saying_where(
    damage: Callable[[bytes], bytes], message: str
) -> None:
    log = build(512, [Entry(0, 1, 0, b"a" * 512), Entry(0, 0, FLUSH)])
    with pytest.raises(LogError, match=message):
        parse(damage(log))


def test_crash_points_outside_the_log_are_refused() -> None:
    log = Log(512, [Entry(0, 0, FLUSH)])
    with pytest.raises(ValueError, match="outside"):
        crash_state(log, 2)
