"""Dirty bitmaps through a real mount: the .ctl commands, and every way a write reaches a
node (the FUSE file, hole punching, the NBD export) marks the node's bitmaps."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.compat.peers import MiB, create
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse]
K64 = 64 << 10


def bitmaps_of(mount: Mount, node: str = "img") -> dict[str, dict[str, Any]]:
    def walk(tree: dict[str, Any]) -> dict[str, Any] | None:
        if tree["node-name"] == node:
            return tree
        for child in tree["children"].values():
            found = walk(child)
            if found is not None:
                return found
        return None

    for backend in mount.status()["backends"]:
        found = walk(backend["tree"])
        if found is not None:
            return {b["name"]: b for b in found["dirty-bitmaps"]}
    raise AssertionError(f"no node {node}")


def dd(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\x5a" * length)
        file.flush()


@pytest.fixture
def disk(mount_factory: Callable[..., Mount], images: Path, tmp_path: Path) -> Mount:
    image = create(images, "d.qcow2", size=64 * MiB)
    return mount_factory(
        "--backend",
        f"d=driver=qcow2,node-name=img,file.driver=file,file.filename={image}",
        "--nbd",
        f"unix:{tmp_path / 'nbd.sock'}",
    )


def test_every_write_marks_the_chunks_it_touches(disk: Mount, tmp_path: Path) -> None:
    disk.ctl("bitmap-add", "img name=b0")
    disk.ctl("bitmap-add", "img name=fine granularity=4K")
    disk.ctl("bitmap-add", "img name=off disabled=on")
    dd(disk / "d", 3 * MiB + 100, 5000)  # 64K chunk 48; 4K chunks 768 and 769
    assert bitmaps_of(disk)["b0"]["count"] == K64
    assert bitmaps_of(disk)["fine"]["count"] == 2 * 4096
    subprocess.run(  # a punched hole reaches the node as a discard
        ["fallocate", "-p", "-o", str(8 * MiB), "-l", str(K64), disk / "d"], check=True
    )
    disk.ctl("export", f"d writable=on socket={tmp_path / 'e.sock'}")
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -z 16M 4K",
            "-c",
            "write 20M 64K",
            f"nbd+unix:///d?socket={tmp_path / 'e.sock'}",
        ],
        check=True,
        capture_output=True,
    )
    found = bitmaps_of(disk)
    assert found["b0"]["count"] == 4 * K64
    assert found["fine"]["count"] == 2 * 4096 + K64 + 4096 + K64
    assert found["off"]["count"] == 0
    assert found["b0"] | {"count": 0} == {
        "name": "b0",
        "count": 0,
        "granularity": K64,
        "recording": True,
        "busy": False,
        "persistent": False,
    }


def test_enable_disable_clear_merge_remove(disk: Mount) -> None:
    disk.ctl("bitmap-add", "img name=a")
    disk.ctl("bitmap-add", "img name=b disabled=on")
    dd(disk / "d", 0, 1)
    disk.ctl("bitmap-enable", "img name=b")
    disk.ctl("bitmap-disable", "img name=a")
    dd(disk / "d", MiB, 1)
    assert {n: b["count"] for n, b in bitmaps_of(disk).items()} == {"a": K64, "b": K64}
    assert not bitmaps_of(disk)["a"]["recording"]
    disk.ctl("bitmap-merge", "img target=b bitmaps=a")
    assert bitmaps_of(disk)["b"]["count"] == 2 * K64
    disk.ctl("bitmap-clear", "img name=b")
    assert bitmaps_of(disk)["b"]["count"] == 0
    disk.ctl("bitmap-remove", "img name=a")
    assert list(bitmaps_of(disk)) == ["b"]


@pytest.mark.parametrize(
    ("verb", "text", "code"),
    [
        ("bitmap-add", "img name=b granularity=3000", errno.EINVAL),
        ("bitmap-add", "img name=b granularity=256", errno.EINVAL),
        ("bitmap-add", "img name=keep", errno.EEXIST),
        ("bitmap-add", "nosuch name=b", errno.ENOENT),
        ("bitmap-add", "img name=b persistent=on bogus=1", errno.EINVAL),
        ("bitmap-remove", "img name=nosuch", errno.ENOENT),
        ("bitmap-clear", "img name=nosuch", errno.ENOENT),
        ("bitmap-merge", "img target=keep bitmaps=keep,nosuch", errno.ENOENT),
    ],
)
def test_bad_bitmap_commands_fail_and_change_nothing(
    disk: Mount, verb: str, text: str, code: int
) -> None:
    disk.ctl("bitmap-add", "img name=keep")
    dd(disk / "d", 0, 1)
    before = bitmaps_of(disk)
    assert disk.ctl_errno(verb, text) == code
    assert bitmaps_of(disk) == before
    assert disk.last_error().startswith(verb)
