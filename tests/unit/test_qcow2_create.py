"""Building the header of a new qcow2 image (:mod:`blkfs_drivers.qcow2.create`) from qemu-img's
``-o`` options: every valid combination gives the header it asks for, every invalid one is
EINVAL naming the option.
"""

from __future__ import annotations

import errno
import re

import pytest
from blkfs_drivers.qcow2.create import CREATE_OPTIONS, build_header
from blkfs_drivers.qcow2.ondisk import (
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    Header,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.block import BlockError
from tests.unit.test_qcow2_ondisk import FIELDS

FAST = settings(max_examples=60, deadline=None)

cluster_bits_st = st.integers(min_value=9, max_value=21)
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


# -- build_header ---------------------------------------------------------------------------


def _size_spellings(cluster_bits: int) -> st.SearchStrategy[str]:
    size = 1 << cluster_bits
    spellings = [str(size)]
    if size >= 1024:
        spellings.append(f"{size >> 10}k")
    if size >= 1 << 20:
        spellings.append(f"{size >> 20}M")
    return st.sampled_from(spellings)


@st.composite
def valid_options(draw: st.DrawFn) -> dict[str, str]:
    cluster_bits = draw(cluster_bits_st)
    compat = draw(st.sampled_from(["1.1", "v3", "0.10", "v2"]))
    v3 = compat in ("1.1", "v3")
    options = {
        "cluster_size": draw(_size_spellings(cluster_bits)),
        "compat": compat,
        "refcount_bits": str(draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))) if v3 else "16",
        "compression_type": draw(st.sampled_from(["zlib", "zstd"])) if v3 else "zlib",
        "extended_l2": (
            draw(st.sampled_from(["on", "off"])) if v3 and cluster_bits >= 14 else "off"
        ),
    }
    keep = draw(st.sets(st.sampled_from(sorted(options))))
    return {key: value for key, value in options.items() if key in keep}


def _spelled_bytes(spelling: str) -> int:
    """Bytes in one of the spellings _size_spellings makes (65536, 64k, 2M)."""
    match = re.fullmatch(r"(\d+)([kM]?)", spelling)
    assert match is not None
    return int(match[1]) << {"": 0, "k": 10, "M": 20}[match[2]]


DEFAULTS = {
    "cluster_size": "65536",
    "compat": "1.1",
    "refcount_bits": "16",
    "compression_type": "zlib",
    "extended_l2": "off",
}


@FAST
@given(
    valid_options(),
    st.integers(0, 1 << 50).map(lambda n: n * 512),
    st.one_of(st.none(), names),
    st.one_of(st.none(), names),
)
def test_valid_options_build_the_header_they_ask_for(
    options: dict[str, str], size: int, backing: str | None, fmt: str | None
) -> None:
    chosen = DEFAULTS | options
    header = build_header(size, options, backing, fmt)
    assert header.cluster_size == _spelled_bytes(chosen["cluster_size"])
    assert header.version == (3 if chosen["compat"] in ("1.1", "v3") else 2)
    assert header.refcount_bits == int(chosen["refcount_bits"])
    assert header.extended_l2 == (chosen["extended_l2"] == "on")
    assert bool(header.incompatible_features & INCOMPAT_EXTL2) == header.extended_l2
    zstd = chosen["compression_type"] == "zstd"
    assert header.compression_type == int(zstd)
    assert bool(header.incompatible_features & INCOMPAT_COMPRESSION) == zstd
    assert header.size == size
    assert (header.backing_file, header.backing_format) == (backing, fmt if backing else None)


@FAST
@given(valid_options(), st.one_of(st.none(), names), st.one_of(st.none(), names))
def test_a_built_header_fits_cluster_zero_and_parses_back(
    options: dict[str, str], backing: str | None, fmt: str | None
) -> None:
    header = build_header(1 << 30, options, backing, fmt)
    data = header.pack()
    assert len(data) <= header.cluster_size
    parsed = Header.unpack(data)
    assert {f: getattr(parsed, f) for f in FIELDS} == {f: getattr(header, f) for f in FIELDS}


OUT_OF_RANGE = {
    "cluster_size": ["256", "1000", "4M", "3k", "96k", "64.5k", "1T"],
    "refcount_bits": ["0", "3", "12", "128", "-16"],
    "compat": ["1.0", "0.9", "v4", "", "1.10"],
    "compression_type": ["lz4", "ZLIB", "", "none"],
}
UNPARSABLE = {
    "cluster_size": ["abc", "64q", "-1", ""],
    "refcount_bits": ["x", "", "16bits", "1.5"],
    "extended_l2": ["maybe", "2", "", "onn"],
}


@st.composite
def one_bad_option(
    draw: st.DrawFn, values: dict[str, list[str]], unknown: bool = False
) -> tuple[dict[str, str], str]:
    """The defaults with one option made invalid, and that option's name."""
    options = DEFAULTS.copy()
    if unknown and draw(st.booleans()):
        name = draw(
            st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda s: s not in CREATE_OPTIONS)
        )
        options[name] = "1"
    else:
        name = draw(st.sampled_from(sorted(values)))
        options[name] = draw(st.sampled_from(values[name]))
    return options, name


def _assert_einval_naming(options: dict[str, str], name: str) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, options, None, None)
    assert err.value.errno == errno.EINVAL
    assert name in str(err.value)


@FAST
@given(one_bad_option(OUT_OF_RANGE, unknown=True))
def test_an_unknown_or_out_of_range_option_is_einval_naming_it(
    case: tuple[dict[str, str], str],
) -> None:
    _assert_einval_naming(*case)


@FAST
@given(one_bad_option(UNPARSABLE))
def test_an_unparsable_option_is_einval_naming_it(case: tuple[dict[str, str], str]) -> None:
    _assert_einval_naming(*case)


@FAST
@given(st.sampled_from(["0", "0k", "9" * 400 + "k"]))
def test_a_zero_or_absurd_cluster_size_is_einval_naming_it(value: str) -> None:
    _assert_einval_naming({"cluster_size": value}, "cluster_size")


@FAST
@given(st.integers(MAX_BACKING_NAME + 1, 4000))
def test_a_backing_name_over_the_limit_is_einval_at_create(length: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {}, "b" * length, None)
    assert err.value.errno == errno.EINVAL and "backing file name" in err.value.message


@FAST
@given(
    st.sampled_from(["0.10", "v2"]),
    st.sampled_from([("refcount_bits", "8"), ("compression_type", "zstd"), ("extended_l2", "on")]),
)
def test_v2_refuses_v3_only_options_naming_compat(compat: str, option: tuple[str, str]) -> None:
    with pytest.raises(BlockError) as err:
        build_header(1 << 20, {"compat": compat, option[0]: option[1]}, None, None)
    assert err.value.errno == errno.EINVAL
    assert "compat" in str(err.value)


@FAST
@given(st.integers(9, 13))
def test_extended_l2_refuses_clusters_under_16k(cluster_bits: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(
            1 << 20, {"cluster_size": str(1 << cluster_bits), "extended_l2": "on"}, None, None
        )
    assert err.value.errno == errno.EINVAL
    assert "extended_l2" in str(err.value) and "cluster_size" in str(err.value)


@FAST
@given(st.integers(9, 12))
def test_a_backing_name_too_big_for_cluster_zero_is_einval(cluster_bits: int) -> None:
    with pytest.raises(BlockError) as err:
        build_header(
            1 << 20, {"cluster_size": str(1 << cluster_bits)}, "n" * (1 << cluster_bits), None
        )
    assert err.value.errno == errno.EINVAL
