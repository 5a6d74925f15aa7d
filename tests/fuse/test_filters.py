"""Filters through a real mount: a blkdebug rule fails dd at exactly one sector until a reopen
heals it; copy-on-read fills the top image as cat reads (qemu-img map is the judge); zero
writes free qcow2 clusters; retuned throttle limits and per-node counters show in status.
Nothing here measures time (the throttle rate is checked by scripts/bench.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import node, pattern_image

pytestmark = [needs_fuse, pytest.mark.fuse]
KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512


def dd(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["dd", *args, "status=none"], capture_output=True, timeout=60)


def qemu_img(*args: str) -> str:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_a_blkdebug_rule_fails_dd_at_one_sector_until_a_reopen_heals_it(
    mount_factory, images: Path
) -> None:
    image = images / "disk.img"
    data = pattern_image(image, 4 * MiB, image_id=1)
    bad = 1001  # sector; in 4 KiB block 125
    mount = mount_factory(
        "--backend",
        f"d=driver=blkdebug,node-name=dbg,"
        f"inject-error.0.event=read,inject-error.0.sector={bad},"
        f"inject-error.0.errno=ENOSPC,image.driver=file,"
        f"image.filename={image}",
    )
    disk = str(mount / "d")
    message = os.strerror(errno.ENOSPC).encode()

    whole = dd(f"if={disk}", "bs=4k")
    assert whole.returncode != 0 and message in whole.stderr
    assert whole.stdout == data[: bad // 8 * 4096]  # every block before the bad one
    rest = dd(f"if={disk}", "bs=4k", f"skip={bad // 8 + 1}")
    assert rest.returncode == 0 and rest.stdout == data[(bad // 8 + 1) * 4096 :]
    for sector, fails in [(bad - 1, False), (bad, True), (bad + 1, False)]:
        one = dd(f"if={disk}", "bs=512", f"skip={sector}", "count=1")
        assert (one.returncode != 0) == fails, sector
        if fails:
            assert message in one.stderr and one.stdout == b""
        else:
            assert one.stdout == data[sector * SECTOR : (sector + 1) * SECTOR]
    # writes were never the rule's business
    assert (
        dd(
            "if=/dev/zero", f"of={disk}", "bs=512", f"seek={bad}", "count=1", "conv=notrunc"
        ).returncode
        == 0
    )
    info = node(mount.backends()["d"]["tree"], "dbg")["info"]
    assert info["injected-errors"] == 2  # the whole dd, and the one of the bad sector
    assert info["rules"] == [{"index": 0, "event": "read", "errno": "ENOSPC", "fired": 2}]

    # a bad rule fails the write with EINVAL, names the option, and the old rule stays
    assert (
        mount.ctl_errno("reopen", "dbg inject-error.0.event=read,inject-error.0.errno=EWHAT")
        == errno.EINVAL
    )
    assert "inject-error.0.errno" in mount.last_error()
    assert dd(f"if={disk}", "bs=512", f"skip={bad}", "count=1").returncode != 0

    subprocess.run(
        f"echo 'dbg inject-error=none' > {mount.path}/.ctl/reopen", shell=True, check=True
    )
    healed = dd(f"if={disk}", "bs=4k")
    expected = bytearray(data)
    expected[bad * SECTOR : (bad + 1) * SECTOR] = bytes(SECTOR)
    assert healed.returncode == 0 and healed.stdout == expected
    assert node(mount.backends()["d"]["tree"], "dbg")["info"]["rules"] == []


@needs_qemu
def test_copy_on_read_fills_the_top_image_with_one_cat(mount_factory, images: Path) -> None:
    size = 8 * MiB
    base = images / "base.img"
    data = bytearray(size)
    regions = [(0, 2 * MiB), (3 * MiB + 4 * KiB, 300 * KiB), (7 * MiB, 64 * KiB + 1)]
    with open(base, "wb") as f:  # data in three regions, holes elsewhere
        f.truncate(size)
        for offset, length in regions:
            data[offset : offset + length] = os.urandom(length)
            f.seek(offset)
            f.write(data[offset : offset + length])
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    mount = mount_factory(
        "--backend",
        f"vol=driver=copy-on-read,node-name=cor,"
        f"file.driver=qcow2,file.file.driver=file,file.file.filename={top}",
    )

    cat = subprocess.run(["cat", str(mount / "vol")], capture_output=True, check=True).stdout
    assert cat == data
    mount.stop()  # drains and flushes; qemu-img is the judge of what the top holds

    extents = json.loads(qemu_img("map", "--output=json", str(top)))
    from_top = [e for e in extents if e["data"] and e["depth"] == 0]
    assert not [e for e in extents if e["data"] and e["depth"] > 0], extents
    for offset, length in regions:
        assert any(
            e["start"] <= offset and offset + length <= e["start"] + e["length"] for e in from_top
        ), (offset, from_top)
    # holes of the whole chain were not copied: the top holds the data clusters only
    assert sum(e["length"] for e in from_top) < 3 * MiB
    assert "No errors were found" in qemu_img("check", str(top))
    alone = subprocess.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "raw",
            f'json:{{"driver": "qcow2", '
            f'"backing": null, "file": {{"driver": "file", '
            f'"filename": "{top}"}}}}',
            str(images / "alone.img"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert alone.returncode == 0, alone.stderr
    assert (images / "alone.img").read_bytes() == data


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@needs_qemu
def test_zero_writes_with_detect_zeroes_unmap_free_qcow2_clusters(
    mount_factory, images: Path
) -> None:
    image = images / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    mount = mount_factory(
        "--backend",
        f"disk=driver=qcow2,node-name=fmt,detect-zeroes=unmap,"
        f"file.driver=file,file.filename={image}",
    )
    disk = str(mount / "disk")
    payload = os.urandom(8 * MiB)
    (images / "payload").write_bytes(payload)
    assert (
        dd(f"if={images / 'payload'}", f"of={disk}", "bs=1M", "conv=notrunc,fsync").returncode == 0
    )
    written = allocated(image)
    assert written >= 8 * MiB

    zeroed = dd("if=/dev/zero", f"of={disk}", "bs=1M", "seek=2", "count=4", "conv=notrunc,fsync")
    assert zeroed.returncode == 0, zeroed.stderr
    assert allocated(image) <= written - 4 * MiB + 256 * KiB
    expected = payload[: 2 * MiB] + bytes(4 * MiB) + payload[6 * MiB :] + bytes(8 * MiB)
    assert (mount / "disk").read_bytes() == expected
    mount.stop()
    assert "No errors were found" in qemu_img("check", str(image))
    extents = json.loads(qemu_img("map", "--output=json", str(image)))
    assert not [
        e
        for e in extents
        if e["data"] and e["start"] < 6 * MiB and 2 * MiB < e["start"] + e["length"]
    ], extents


def test_throttle_retune_shows_in_status_and_a_bad_one_changes_nothing(
    mount_factory, images: Path
) -> None:
    a, b = images / "a.img", images / "b.img"
    pattern_image(a, 4 * MiB, image_id=1)
    pattern_image(b, 4 * MiB, image_id=2)
    mount = mount_factory(
        "--backend",
        f"a=driver=throttle,node-name=ta,throttle-group=g,limits.bps-read=1G,"
        f"file.driver=file,file.filename={a}",
        "--backend",
        f"b=driver=throttle,node-name=tb,throttle-group=g,file.driver=file,file.filename={b}",
    )

    def limits(name: str) -> dict:
        return mount.backends()[name]["tree"]["info"]["limits"]

    assert limits("a") == limits("b") == {"bps-read": 1 << 30}
    mount.ctl("reopen", "ta limits.iops-read=5000")  # bps-read, not given, keeps its value
    assert limits("a") == limits("b") == {"bps-read": 1 << 30, "iops-read": 5000}
    assert mount.backends()["a"]["tree"]["options"]["limits.iops-read"] == 5000
    mount.ctl("reopen", "tb limits.bps-read=512M")  # any member retunes the group
    assert limits("a") == limits("b") == {"bps-read": 512 * MiB}

    before = mount.backends()
    assert mount.ctl_errno("reopen", "ta limits.bps-total=1M") == errno.EINVAL
    assert "limits.bps-total" in mount.last_error()
    assert mount.ctl_errno("reopen", "ta limits.bps-read=lots") == errno.EINVAL
    assert mount.ctl_errno("reopen", "ta file.filename=/etc/passwd") == errno.EINVAL
    assert mount.ctl_errno("reopen", "ta driver=blkdebug") == errno.EINVAL
    assert mount.ctl_errno("reopen", "nosuch limits.bps-read=1M") == errno.ENOENT
    assert mount.backends() == before

    # far under the limits: nothing waits, and the data is untouched by the filter
    assert (mount / "a").read_bytes()[:4096] == a.read_bytes()[:4096]
    info = mount.backends()["a"]["tree"]["info"]
    assert info["throttled-requests"] == 0 and info["throttled-ns"] == 0


def test_status_shows_every_nodes_options_and_counters(mount_factory, images: Path) -> None:
    image = images / "disk.img"
    pattern_image(image, 4 * MiB, image_id=1)
    mount = mount_factory(
        "--backend",
        f"d=driver=throttle,node-name=thr,limits.bps-read=2M,"
        f"file.driver=blkdebug,file.node-name=dbg,"
        f"file.inject-error.0.event=read,file.inject-error.0.sector=2048,"
        f"file.drop-writes=on,"
        f"file.image.driver=file,file.image.node-name=host,"
        f"file.image.filename={image}",
    )
    disk = str(mount / "d")
    assert dd(f"if={disk}", "of=/dev/null", "bs=64k", "count=16").returncode == 0  # 1 MiB
    assert dd(f"if={disk}", "of=/dev/null", "bs=4k", "skip=256", "count=1").returncode != 0
    assert dd("if=/dev/zero", f"of={disk}", "bs=4k", "count=2", "conv=notrunc").returncode == 0
    mount.ctl("reopen", "thr limits.bps-read=3M")

    tree = mount.backends()["d"]["tree"]
    thr, dbg, host = node(tree, "thr"), node(tree, "dbg"), node(tree, "host")
    assert thr["options"]["limits.bps-read"] == 3 * MiB
    assert thr["info"]["limits"] == {"bps-read": 3 * MiB}
    assert thr["info"]["throttled-requests"] > 0 and thr["info"]["throttled-ns"] > 0
    assert thr["stats"]["read_ops"] == 16 and thr["stats"]["errors"] == 1
    assert dbg["options"]["inject-error.0.sector"] == 2048
    assert dbg["info"]["injected-errors"] == 1 and dbg["info"]["dropped-writes"] >= 1
    assert dbg["stats"]["errors"] == 1
    assert host["stats"]["write_ops"] == 0  # the writes were dropped above it
    assert host["stats"]["read_ops"] >= 16

    text = (mount / ".ctl" / "status").read_text()
    for name in ("thr", "dbg", "host"):
        assert f"[{name}]" in text
    assert "injected-errors=1" in text and "throttled-ns=" in text


def test_status_text_shows_each_nodes_current_options(mount_factory, images: Path) -> None:
    image = images / "disk.img"
    pattern_image(image, MiB, image_id=1)
    mount = mount_factory(
        "--backend",
        f"d=driver=throttle,node-name=thr,limits.bps-read=2M,"
        f"file.driver=blkdebug,file.node-name=dbg,"
        f"file.inject-error.0.event=read,file.inject-error.0.sector=7,"
        f"file.image.driver=file,file.image.filename={image}",
    )
    mount.ctl("reopen", "thr limits.bps-read=3M")
    lines = (mount / ".ctl" / "status").read_text().splitlines()
    thr = next(line for line in lines if "[thr]" in line)
    dbg = next(line for line in lines if "[dbg]" in line)
    assert "limits.bps-read=" in thr and ("3M" in thr or str(3 * MiB) in thr)
    assert "inject-error.0.sector=7" in dbg
