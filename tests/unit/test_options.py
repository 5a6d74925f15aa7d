"""The option parser and schemas: properties over generated input, and errors that name names."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block.options import (
    ChildSpec,
    Option,
    flatten,
    format_options,
    parse_options,
    parse_size,
    validate,
)
from blkfs.errors import OptionError

KEY = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
VALUE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20).filter(
    lambda v: v.strip() == v and v not in ("on", "off", "null")
)


def trees(depth: int = 3) -> st.SearchStrategy[dict]:
    leaf = st.dictionaries(KEY, VALUE, min_size=1, max_size=4)
    return st.recursive(
        leaf,
        lambda children: st.dictionaries(KEY, st.one_of(VALUE, children), min_size=1, max_size=4),
        max_leaves=10,
    )


@settings(max_examples=300)
@given(trees())
def test_dotted_spelling_round_trips(tree: dict) -> None:
    text = format_options(tree)
    if not text.split(",")[0].count("="):  # a bare first value would read as a path
        return
    assert parse_options(text) == tree


@settings(max_examples=200)
@given(trees())
def test_json_and_dotted_spellings_agree(tree: dict) -> None:
    text = format_options(tree)
    if "=" in text.split(",")[0]:
        assert parse_options(json.dumps(tree)) == parse_options(text)


@settings(max_examples=500)
@given(st.text(max_size=200))
def test_garbage_parses_or_raises_option_error(text: str) -> None:
    try:
        tree = parse_options(text)
    except OptionError:
        return
    assert isinstance(tree, dict) and flatten(tree) is not None


def test_path_shorthand_and_escaped_commas() -> None:
    assert parse_options("/img/a,,b.qcow2") == {
        "file": {"driver": "file", "filename": "/img/a,b.qcow2"}
    }
    assert parse_options("/iso/x.iso,read-only=on") == {
        "read-only": "on",
        "file": {"driver": "file", "filename": "/iso/x.iso"},
    }
    assert parse_options('{"driver": "null", "inject": [{"a": 1}, {"a": 2}]}') == {
        "driver": "null",
        "inject": {"0": {"a": 1}, "1": {"a": 2}},
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("a=1,a=2", "given twice"),
        ("a=1,a.b=2", "conflicts"),
        ("a..b=1", "invalid option name"),
        ("driver=raw,novalue", "expected key=value"),
        ("/path,driver=raw", "cannot be combined"),
        ("[1, 2]", "expected key=value"),
        ('{"a": ' * 50 + "1" + "}" * 50, "nested"),
        ("{not json", "invalid JSON"),
        ("", "no options"),
    ],
)
def test_malformed_spellings(text: str, message: str) -> None:
    with pytest.raises(OptionError) as err:
        parse_options(text)
    assert message in str(err.value)


SUFFIXES = [("", 1), ("k", 1024), ("K", 1024), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)]


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.sampled_from(SUFFIXES))
def test_sizes_are_exact_up_to_64_bits(number: int, suffix: tuple[str, int]) -> None:
    text = f"{number}{suffix[0]}"
    if number * suffix[1] < 1 << 64:
        assert parse_size(text) == number * suffix[1]
    else:
        with pytest.raises(ValueError, match="too large"):
            parse_size(text)


SCHEMA = {
    "size": Option("size", 4096, "bytes"),
    "mode": Option("enum", "a", choices=("a", "b")),
    "limit.*.rate": Option("int", None),
    "name": Option("str", None),
}


def test_validation_types_defaults_and_wildcards() -> None:
    checked = validate(
        "demo",
        SCHEMA,
        {"file": ChildSpec()},
        {"size": "1M", "limit": {"0": {"rate": "10"}}, "file": "n0", "read-only": "on"},
    )
    assert checked.values["size"] == 1 << 20 and checked.values["mode"] == "a"
    assert checked.values["limit.0.rate"] == 10 and checked.values["read-only"] is True
    assert checked.children == {"file": "n0"}


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"sise": "1", "file": "x"}, "demo: unknown option 'sise'"),
        ({"size": "big", "file": "x"}, "demo: option 'size'"),
        ({"mode": "c", "file": "x"}, "must be one of a, b"),
        ({"limit": {"x": {"rate": "1"}}, "file": "x"}, "unknown option 'limit.x.rate'"),
        ({"read-only": "maybe", "file": "x"}, "option 'read-only' must be on or off"),
        ({}, "child 'file' is required"),
        ({"file": 5}, "child 'file' must be options or a node name"),
    ],
)
def test_validation_errors_name_the_option_and_the_driver(tree: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        validate("demo", SCHEMA, {"file": ChildSpec()}, tree)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text", ["10Mb", "10MB", "10 M", "10MiB", " 10M", "10M ", "0x10", "10MM", "1e3"]
)
def test_sizes_are_spelled_as_qemu_spells_them(text: str) -> None:
    with pytest.raises(ValueError, match="one suffix of B, K, M, G, T, P, E"):
        parse_size(text)


@pytest.mark.parametrize(
    "text, size",
    [
        ("10M", 10 << 20),
        ("10m", 10 << 20),
        ("1.5G", 3 << 29),
        ("512", 512),
        ("4k", 4096),
        ("7B", 7),
    ],
)
def test_qemu_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_mistyped_errno_name_says_so_and_suggests() -> None:
    schema = {"errno": Option("errno", None)}
    with pytest.raises(OptionError) as err:
        validate("blkdebug", schema, {}, {"errno": "EOI"})
    assert "unknown errno name" in str(err.value) and "did you mean EIO?" in str(err.value)
    assert validate("blkdebug", schema, {}, {"errno": "enospc"}).values["errno"] == 28
    assert validate("blkdebug", schema, {}, {"errno": "5"}).values["errno"] == 5


def test_a_mistyped_option_is_unknown_with_the_close_match() -> None:
    with pytest.raises(OptionError) as err:
        validate("demo", SCHEMA, {"file": ChildSpec()}, {"szie": "1", "file": "x"})
    assert "unknown option 'szie' (did you mean 'size'?" in str(err.value)
