"""The QMP wire format without I/O: values split where their brackets balance."""

from __future__ import annotations

import json
import random

from blkfs.frontends.qmp.stream import MAX_DEPTH, MAX_MESSAGE, ParseError, Splitter


def test_values_split_without_newlines_and_across_feeds() -> None:
    splitter = Splitter()
    assert splitter.feed(b'{"execute": "a"}{"execute"') == [{"execute": "a"}]
    assert splitter.feed(b': "b", "id": "}{\\""}\r\n') == [{"execute": "b", "id": '}{"'}]


def test_a_bad_value_is_one_error_and_the_stream_stays_in_step() -> None:
    splitter = Splitter()
    out = splitter.feed(b'{]\n{"a": }\nbad\n[1]\n{"ok": 1}')
    assert [type(v) for v in out] == [ParseError] * 3 + [list, dict]
    assert all(v.desc.startswith("JSON parse error, ") for v in out[:3])
    assert out[3:] == [[1], {"ok": 1}]


def test_huge_and_deep_values_are_skipped_whole() -> None:
    splitter = Splitter()
    huge = b'{"a": "' + b"x" * MAX_MESSAGE + b'"}'
    out = splitter.feed(huge + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"{}")
    assert [type(v) for v in out] == [ParseError, ParseError, dict]
    assert "larger" in out[0].desc and "deeper" in out[1].desc


def test_random_bytes_never_raise_and_a_clean_value_follows() -> None:
    rng = random.Random(17)
    for _ in range(300):
        splitter = Splitter()
        noise = bytes(rng.choice(b'{}[]":,\\ \nab1') for _ in range(rng.randrange(60)))
        splitter.feed(noise)
        # whatever state the noise left, closing every bracket resynchronises
        tail = splitter.feed(b'"' + b"]" * 70 + b"}" * 70 + b"\n")
        out = splitter.feed(b'{"x": 1}')
        assert all(
            isinstance(v, (ParseError, dict, list, str, int, float)) or v is None for v in tail
        )
        if out:
            assert out[-1] == {"x": 1} or isinstance(out[-1], ParseError)


def test_values_match_json() -> None:
    value = {"execute": "blockdev-add", "arguments": {"a": [1, {"b": "c\\"}], "d": None}}
    assert Splitter().feed(json.dumps(value).encode()) == [value]
