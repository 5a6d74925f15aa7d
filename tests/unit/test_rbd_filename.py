"""The ``rbd:`` filename shorthand (QEMU's qemu_rbd_parse_filename): pure parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.block.options import parse_options, rbd_filename
from blkfs.errors import OptionError


@pytest.mark.parametrize(
    "name, tree",
    [
        ("rbd:volumes/vol", {"pool": "volumes", "image": "vol"}),
        ("rbd:volumes/vol@monday", {"pool": "volumes", "image": "vol", "snapshot": "monday"}),
        ("rbd:volumes/tenant/vol", {"pool": "volumes", "namespace": "tenant", "image": "vol"}),
        (
            "rbd:p/i@s:conf=/etc/ceph/b.conf:id=cinder",
            {
                "pool": "p",
                "image": "i",
                "snapshot": "s",
                "conf": "/etc/ceph/b.conf",
                "user": "cinder",
            },
        ),
        (r"rbd:p/a\:b\@c", {"pool": "p", "image": "a:b@c"}),
        ("rbd:p/i:conf=/x@y", {"pool": "p", "image": "i", "conf": "/x@y"}),
    ],
)
def test_qemus_spellings(name: str, tree: dict[str, str]) -> None:
    assert rbd_filename(name) == {"driver": "rbd", **tree}


@pytest.mark.parametrize(
    "name", ["rbd:", "rbd:pool", "rbd:/image", "rbd:p/", "rbd:p/i:mon_host=x", "rbd:p/i:conf"]
)
def test_malformed_names_say_what_is_expected(name: str) -> None:
    with pytest.raises(OptionError, match="invalid rbd name"):
        rbd_filename(name)


def test_options_may_follow_the_name() -> None:
    assert parse_options("rbd:p/i:conf=/c,read-only=on,io-timeout=5") == {
        "driver": "rbd",
        "pool": "p",
        "image": "i",
        "conf": "/c",
        "read-only": "on",
        "io-timeout": "5",
    }


def escaped(text: str) -> str:
    return "".join("\\" + c if c in "\\/@:" else c for c in text)


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(names, st.none() | names, names, st.none() | names)
def test_any_escaped_name_parses_back(
    pool: str, namespace: str | None, image: str, snapshot: str | None
) -> None:
    spec = escaped(pool) + "/"
    if namespace is not None:
        spec += escaped(namespace) + "/"
    spec += escaped(image)
    if snapshot is not None:
        spec += "@" + escaped(snapshot)
    tree = rbd_filename("rbd:" + spec)
    assert tree.get("pool") == pool and tree.get("image") == image
    assert tree.get("namespace") == namespace and tree.get("snapshot") == snapshot


@given(st.text(max_size=40))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        tree = rbd_filename("rbd:" + text)
    except OptionError:
        return
    assert tree["driver"] == "rbd" and tree["pool"] and tree["image"]
