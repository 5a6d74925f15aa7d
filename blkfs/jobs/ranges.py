"""A set of byte ranges, kept merged and sorted: what a job still has to copy.

A mirror of a 1 TiB disk starts with one range, not sixteen million chunk bits, and the
writes that dirty it again add a few ranges each. Pure: tested with plain values.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator


class RangeSet:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self)

    def add(self, start: int, end: int) -> int:
        """Add [start, end), merging what it touches; returns how many bytes are new."""
        if start >= end:
            return 0
        first = bisect.bisect_left(self._ends, start)  # the first range ending at or after start
        last = bisect.bisect_right(self._starts, end)  # past the last range starting by end
        merged = sum(self._ends[i] - self._starts[i] for i in range(first, last))
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]
        return end - start - merged

    def take(self, start: int, end: int) -> list[tuple[int, int]]:
        """Take the parts of [start, end) that are in the set out of it."""
        taken: list[tuple[int, int]] = []
        if start >= end:
            return taken
        index = bisect.bisect_right(self._ends, start)
        while index < len(self._starts) and self._starts[index] < end:
            lo, hi = self._starts[index], self._ends[index]
            taken.append((max(lo, start), min(hi, end)))
            pieces = [(a, b) for a, b in ((lo, start), (end, hi)) if a < b]
            self._starts[index : index + 1] = [a for a, _ in pieces]
            self._ends[index : index + 1] = [b for _, b in pieces]
            index += len(pieces)
        return taken

    def pop_first(self, most: int) -> tuple[int, int] | None:
        """Take the first at most ``most`` bytes out of the set: (start, end), or None."""
        if not self._starts:
            return None
        start, end = self._starts[0], self._ends[0]
        stop = min(end, start + most)
        if stop == end:
            del self._starts[0], self._ends[0]
        else:
            self._starts[0] = stop
        return start, stop
