"""The options of ``docker volume create -d blkfs`` and the volume names a file cannot hold:
pure functions, tested with values."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.errors import BlockError
from blkfs.frontends.volumes.options import Creation, creation
from blkfs.frontends.volumes.store import PLAIN_NAME, key_of

KEYS = ["size", "base", "format", "fs", "keep", "throttle.bps-total", "throttle.x", "colour"]


@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12), st.text(max_size=12)))
def test_any_options_give_a_creation_or_a_clean_error(opts: dict[str, str]) -> None:
    try:
        made = creation(opts)
    except BlockError as exc:
        assert exc.errno == errno.EINVAL and str(exc)
    else:
        assert made.size is not None or made.base is not None
        assert made.format in ("qcow2", "raw") and made.fs in ("ext4", "xfs")


def test_the_options_as_docker_passes_them() -> None:
    opts = {"base": "web", "fs": "xfs", "keep": "on", "throttle.iops-write": "500"}
    assert creation(opts) == Creation(None, "web", "qcow2", "xfs", True, {"iops-write": "500"})
    with pytest.raises(BlockError, match="raw image has no backing"):
        creation({"base": "web", "format": "raw"})


@given(st.text(min_size=1, max_size=300))
def test_every_name_has_a_key_a_file_and_a_backend_can_be_named(name: str) -> None:
    key = key_of(name)
    assert PLAIN_NAME.match(key) and "/" not in key and not key.startswith(".")
    assert key == name or key.startswith("vol-")


def test_names_that_would_collide_with_a_hashed_key_are_hashed_too() -> None:
    assert key_of("vol-0123") != "vol-0123" and key_of("web") == "web"
