"""``blkfs image commit``, ``rebase`` and ``convert`` (the block jobs, in-process) against
qemu-img: the same images in, the same guest data out, and images qemu-img checks clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compat.peers import qemu, qemu_io, to_raw
from tests.conftest import needs_qemu
from tests.helpers import blkfs

pytestmark = [needs_qemu, pytest.mark.qemu]
MiB = 1 << 20


def chain3(d: Path) -> tuple[Path, Path, Path]:
    """base <- mid <- top, each layer writing some ranges (and zeroing one) over the one
    below, as qemu-img and qemu-io make them."""
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "qcow2", "write -P 0x11 0 8M")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io(mid, "qcow2", "write -P 0x22 1M 2M", "write -z 5M 64k")
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 0x33 2M 1536k", "write -P 0x44 7M 4k")
    return base, mid, top


def backing(image: Path) -> str | None:
    info = json.loads(qemu("qemu-img", "info", "--output=json", image))
    return info.get("backing-filename")


def data_in(image: Path) -> int:
    """Bytes the image itself holds (not its backing files)."""
    extents = json.loads(qemu("qemu-img", "map", "--output=json", image))
    return sum(e["length"] for e in extents if e["data"] and e["depth"] == 0)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_reads_what_qemu_img_reads(images: Path, fmt: str) -> None:
    _, _, top = chain3(images)
    out = images / f"out.{fmt}"
    result = blkfs("image", "convert", "-p", "-O", fmt, str(top), str(out))
    assert "image: backup concluded 8.0 MiB of 8.0 MiB (100%)" in result.stderr
    assert to_raw(out) == to_raw(top)
    if fmt == "qcow2":
        qemu("qemu-img", "check", out)
        assert backing(out) is None
        assert data_in(out) < 8 * MiB  # the zeroed range stayed sparse


@pytest.mark.parametrize(
    ("cache", "fmt"), [("unsafe", "qcow2"), ("none", "raw"), ("none", "qcow2")]
)
def test_convert_in_each_cache_mode_reads_what_qemu_img_reads(
    images: Path, cache: str, fmt: str
) -> None:
    """-t and -T as qemu-img's: the same image whatever the cache modes."""
    _, _, top = chain3(images)
    out = images / f"out.{fmt}"
    blkfs("image", "convert", "-t", cache, "-T", "none", "-O", fmt, str(top), str(out))
    assert to_raw(out) == to_raw(top)
    if fmt == "qcow2":
        qemu("qemu-img", "check", out)
        assert data_in(out) < 8 * MiB


def test_commit_matches_qemu_img_commit(images: Path) -> None:
    base, mid, top = chain3(images)
    expected = to_raw(top)
    theirs = images / "theirs"
    theirs.mkdir()
    for image in (base, mid, top):
        (theirs / image.name).write_bytes(image.read_bytes())
    qemu("qemu-img", "commit", theirs / "top.qcow2")
    blkfs("image", "commit", str(top))
    assert to_raw(mid) == to_raw(theirs / "mid.qcow2") == expected
    assert to_raw(top) == expected and data_in(top) == 0  # emptied, as qemu-img does
    for image in (base, mid, top):
        qemu("qemu-img", "check", image)


def test_commit_into_a_lower_base_and_keep_the_overlay(images: Path) -> None:
    base, mid, top = chain3(images)
    expected = to_raw(top)
    blkfs("image", "commit", "-d", "-b", "base.qcow2", str(top))
    assert to_raw(base) == expected and data_in(top) > 0
    for image in (base, mid, top):
        qemu("qemu-img", "check", image)


def test_rebase_onto_a_lower_image_and_onto_none(images: Path) -> None:
    _, _, top = chain3(images)
    expected = to_raw(top)
    blkfs("image", "rebase", "-b", "base.qcow2", str(top))
    assert backing(top) == "base.qcow2" and to_raw(top) == expected
    qemu("qemu-img", "check", top)
    blkfs("image", "rebase", "-b", "", str(top))
    assert backing(top) is None and to_raw(top) == expected
    qemu("qemu-img", "check", top)


def test_unsafe_rebase_rewrites_only_the_header(images: Path) -> None:
    _, mid, top = chain3(images)
    copy = images / "copy-of-mid.qcow2"
    qemu("qemu-img", "convert", "-O", "qcow2", mid, copy)  # the same data, elsewhere
    expected = to_raw(top)
    blkfs("image", "rebase", "-u", "-b", copy.name, str(top))
    assert backing(top) == copy.name and to_raw(top) == expected
    qemu("qemu-img", "check", top)
    assert (
        json.loads(qemu("qemu-img", "info", "--output=json", top))["backing-filename-format"]
        == "qcow2"
    )


def test_bad_offline_jobs_say_why_and_change_nothing(images: Path) -> None:
    base, mid, top = chain3(images)
    before = {p: p.read_bytes() for p in (base, mid, top)}
    refused = blkfs("image", "commit", str(base), check=False)
    assert refused.returncode == 1 and "no backing file" in refused.stderr
    refused = blkfs("image", "rebase", "-b", "elsewhere.qcow2", str(top), check=False)
    assert refused.returncode == 1 and "elsewhere.qcow2': No such file" in refused.stderr
    refused = blkfs("image", "convert", str(top), str(mid), check=False)
    assert refused.returncode == 1 and "exists" in refused.stderr
    assert {p: p.read_bytes() for p in (base, mid, top)} == before


def test_safe_rebase_onto_an_unrelated_image_keeps_what_the_guest_reads(images: Path) -> None:
    """As qemu-img rebase without -u: where the new backing file differs from the old
    chain, FILE gets the old chain's data (zeros as zeros), so it reads the same."""
    _, _, top = chain3(images)
    other = images / "other.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", other, "6M")  # shorter than top
    qemu_io(other, "qcow2", "write -P 0x11 0 1M", "write -P 0x55 1M 3M", "write -P 0x66 4M 1M")
    expected = to_raw(top)
    held = data_in(top)
    blkfs("image", "rebase", "-b", other.name, "-F", "qcow2", str(top))
    assert backing(top) == other.name and to_raw(top) == expected
    qemu("qemu-img", "check", top)
    # only what differs was copied: the first MiB, the same in both, was not
    assert held < data_in(top) < held + 7 * MiB
