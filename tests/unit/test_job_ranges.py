"""The byte-range set jobs keep of what they still have to copy, against a plain model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from blkfs.jobs.ranges import RangeSet

SPAN = st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))


@given(st.lists(st.tuples(st.sampled_from(["add", "take", "pop"]), SPAN), max_size=40))
def test_the_set_behaves_as_a_set_of_bytes(operations: list[tuple[str, tuple[int, int]]]) -> None:
    ranges, model = RangeSet(), set()
    for kind, (start, end) in operations:
        if kind == "add":
            added = ranges.add(start, end)
            assert added == len(set(range(start, end)) - model)
            model |= set(range(start, end))
        elif kind == "take":
            taken = ranges.take(start, end)
            assert {b for lo, hi in taken for b in range(lo, hi)} == model & set(range(start, end))
            model -= set(range(start, end))
        else:
            span = ranges.pop_first(end - start or 1)
            if not model:
                assert span is None
                continue
            assert span is not None and span[0] == min(model)
            assert set(range(*span)) <= model
            model -= set(range(*span))
        spans = list(ranges)
        assert {b for lo, hi in spans for b in range(lo, hi)} == model
        assert all(lo < hi for lo, hi in spans)
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # merged
        assert ranges.total == len(model) and bool(ranges) == bool(model)
