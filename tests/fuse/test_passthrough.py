"""Kernel FUSE passthrough (``passthrough=on``): opens of a raw-over-file backend are served
by the kernel straight from the host file, and the backend is held still while they live.

Each test makes a real mount and reads and writes with dd, cat and plain descriptors. That the
kernel, not blkfs, served the I/O shows in the backend's statistics, which count no request
that passthrough served (and count those blkfs served when an open falls back).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount, blkfs, pattern_image, without_stats

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20
PASSTHROUGH = "werror=report,passthrough=on"


def raw_over_file(image: Path, extra: str = PASSTHROUGH) -> str:
    return (
        f"driver=raw,node-name=fmt,file.driver=file,file.node-name=host,"
        f"file.filename={image},{extra}"
    )


@pytest.fixture
def pt_mount(mount: Mount) -> Mount:
    """The mount, if its kernel took passthrough (Linux 6.9+ built with
    CONFIG_FUSE_PASSTHROUGH, and a daemon with CAP_SYS_ADMIN): its log says so once INIT
    is answered. Tests that use it skip, even in CI, on a kernel without it."""
    for line in mount.log.read_text().splitlines():
        if "FUSE passthrough: " in line:
            said = line.split("FUSE passthrough: ", 1)[1]
            if said != "available":
                pytest.skip(f"no kernel passthrough here: {said}")
            return mount
    raise AssertionError("the mount's log does not say whether the kernel took passthrough")


def served(mount: Mount, name: str = "d0") -> tuple[int, int]:
    """(reads, writes) that blkfs itself served for the backend."""
    stats = mount.backends()[name]["stats"]
    return stats["read_ops"], stats["write_ops"]


@pytest.mark.kernel_module("fuse passthrough")
def test_dd_and_cat_get_the_host_files_bytes_and_writes_land(pt_mount: Mount, images: Path) -> None:
    image = images / "a.raw"
    data = pattern_image(image, 4 * MiB, 1)
    pt_mount.ctl("create", f"d0 {raw_over_file(image)}")
    assert pt_mount.backends()["d0"]["passthrough"] == {"on": True, "open": 0, "why-not": None}

    cat = subprocess.run(["cat", pt_mount / "d0"], capture_output=True, check=True)
    assert cat.stdout == data
    dd = subprocess.run(
        ["dd", f"if={pt_mount / 'd0'}", "bs=4k", "skip=100", "count=3", "status=none"],
        capture_output=True,
        check=True,
    )
    assert dd.stdout == data[100 * 4096 : 103 * 4096]
    new = os.urandom(8192)
    subprocess.run(
        ["dd", f"of={pt_mount / 'd0'}", "bs=4k", "seek=7", "conv=notrunc", "status=none"],
        input=new,
        check=True,
    )
    assert image.read_bytes()[7 * 4096 : 9 * 4096] == new
    with open(pt_mount / "d0", "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        assert mapped[7 * 4096 : 9 * 4096] == new
        assert pt_mount.backends()["d0"]["passthrough"]["open"] == 1
    assert served(pt_mount) == (0, 0)  # the kernel served every read and write
    assert pt_mount.backends()["d0"]["passthrough"]["open"] == 0
    # what the kernel still sends to blkfs: fallocate (a zeroed range), fsync
    subprocess.run(["fallocate", "-z", "-o", "8192", "-l", "4096", pt_mount / "d0"], check=True)
    assert image.read_bytes()[8192:12288] == bytes(4096)
    assert pt_mount.backends()["d0"]["stats"]["zero_ops"] == 1


@pytest.mark.kernel_module("fuse passthrough")
def test_every_change_is_refused_while_a_passthrough_file_is_open(
    pt_mount: Mount, images: Path
) -> None:
    image, other = images / "a.raw", images / "b.raw"
    pattern_image(image, 4 * MiB, 1)
    pattern_image(other, 4 * MiB, 2)
    pt_mount.ctl("create", f"d0 {raw_over_file(image)}")
    refused = [
        ("change", f"d0 driver=raw,file.driver=file,file.filename={other}"),
        ("change", "d0 driver=throttle,file=fmt"),  # a filter put in
        ("eject", "d0 force=on"),
        ("delete", "d0 force=on"),
        ("resize", "d0 8M"),
        ("snapshot", f"d0 {images / 's.qcow2'}"),
        ("backup", f"d0 {images / 'backup.raw'} format=raw"),
        ("throttle", "d0 bps-read=1M"),
        ("bitmap-add", "host name=b0"),
        ("reopen", "host cache.direct=on"),
        ("set", "d0 werror=stop"),
    ]
    with open(pt_mount / "d0", "r+b") as f:
        before = without_stats(pt_mount.status())
        for verb, text in refused:
            assert pt_mount.ctl_errno(verb, text) == errno.EBUSY, (verb, text)
            assert "open with kernel passthrough (1 file" in pt_mount.last_error(), verb
        with pytest.raises(OSError) as truncated:
            os.truncate(pt_mount / "d0", 8 * MiB)
        assert truncated.value.errno == errno.EBUSY
        assert without_stats(pt_mount.status()) == before
        assert not (images / "s.qcow2").exists()
        f.seek(4096)
        f.write(b"still written")
        f.flush()
    assert image.read_bytes()[4096:4109] == b"still written"
    pt_mount.ctl("change", f"d0 driver=raw,file.driver=file,file.filename={other}")
    assert (pt_mount / "d0").read_bytes() == other.read_bytes()


@pytest.mark.kernel_module("fuse passthrough")
def test_several_opens_share_the_host_file(pt_mount: Mount, images: Path) -> None:
    image = images / "a.raw"
    data = pattern_image(image, MiB, 1)
    pt_mount.ctl("create", f"d0 {raw_over_file(image)}")
    first = os.open(pt_mount / "d0", os.O_RDONLY)
    second = os.open(pt_mount / "d0", os.O_RDWR)
    try:
        assert pt_mount.backends()["d0"]["passthrough"]["open"] == 2
        status = (pt_mount / ".ctl" / "status").read_text()
        assert "d0: passthrough=on, 2 file(s) served by the kernel" in status
        os.pwrite(second, b"written by the second", 8192)
        assert os.pread(first, 21, 8192) == b"written by the second"
        os.close(first)
        first = -1
        assert pt_mount.ctl_errno("eject", "d0") == errno.EBUSY  # one is still open
        assert os.pread(second, 4096, 0) == data[:4096]
    finally:
        for fd in (first, second):
            if fd >= 0:
                os.close(fd)
    assert served(pt_mount) == (0, 0)
    pt_mount.ctl("eject", "d0")


@pytest.mark.parametrize(
    ("medium", "says"),
    [
        ("{image},werror=report", "this raw image was probed"),
        ("{raw}", "it needs werror=report and rerror=report"),
        (
            "driver=raw,offset=4096,file.driver=file,file.filename={image},werror=report",
            "shows part of its file",
        ),
        (
            "driver=raw,size=1M,file.driver=file,file.filename={image},werror=report",
            "shows part of its file",
        ),
        (
            "driver=throttle,file.driver=raw,file.file.driver=file,"
            "file.file.filename={image},werror=report",
            "the medium is throttle (file: raw (file: file))",
        ),
        ("{qcow2},werror=report", "the medium is qcow2 (file: file)"),
    ],
)
def test_a_medium_that_does_not_qualify_is_refused(
    mount: Mount, images: Path, medium: str, says: str
) -> None:
    image, qcow2 = images / "a.raw", images / "a.qcow2"
    pattern_image(image, 4 * MiB, 1)
    blkfs("image", "create", "-f", "qcow2", str(qcow2), "4M")
    text = medium.format(image=image, qcow2=qcow2, raw=raw_over_file(image, "").rstrip(","))
    assert mount.ctl_errno("create", f"d0 {text},passthrough=on") == errno.EINVAL
    assert "cannot serve it with passthrough=on" in mount.last_error()
    assert says in mount.last_error()
    assert mount.backends() == {}


@pytest.mark.kernel_module("fuse passthrough")
def test_an_open_is_served_by_blkfs_while_the_tree_does_not_qualify(
    pt_mount: Mount, images: Path
) -> None:
    image = images / "a.raw"
    data = pattern_image(image, MiB, 1)
    pt_mount.ctl("create", f"d0 {raw_over_file(image)}")
    pt_mount.ctl("set", "d0 werror=stop")  # no passthrough file is open: allowed
    assert "werror=report" in pt_mount.backends()["d0"]["passthrough"]["why-not"]
    with open(pt_mount / "d0", "rb") as f:
        assert f.read(4096) == data[:4096]
        assert pt_mount.backends()["d0"]["passthrough"]["open"] == 0
        pt_mount.ctl("resize", "d0 2M")  # nothing holds the backend
    assert served(pt_mount)[0] >= 1
    pt_mount.ctl("set", "d0 werror=report")
    reads = served(pt_mount)[0]
    assert (pt_mount / "d0").read_bytes()[: len(data)] == data
    assert served(pt_mount)[0] == reads


IN_A_USER_NAMESPACE = """
import json, sys
from pathlib import Path
from tests.helpers import Mount
mount = Mount.start(Path(sys.argv[1]))
try:
    mount.ctl("create", "d0 " + sys.argv[2])
    read = (mount / "d0").read_bytes()
    status = mount.backends()["d0"]
finally:
    mount.stop()
print(json.dumps({"read": read.hex(), "status": status, "log": mount.log.read_text()}))
"""


def test_a_kernel_that_refuses_passthrough_leaves_the_opens_to_blkfs(
    tmp_path: Path, images: Path
) -> None:
    """In a user namespace the daemon is root there but lacks CAP_SYS_ADMIN where the kernel
    looks (the initial namespace), so the kernel refuses its backing files: a real kernel
    refusal, as a kernel without passthrough gives another."""
    image = images / "a.raw"
    data = pattern_image(image, MiB, 1)
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [
            *("unshare", "--user", "--map-root-user", "--mount"),
            *(sys.executable, "-c", IN_A_USER_NAMESPACE, tmp_path / "mnt", raw_over_file(image)),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    seen = json.loads(result.stdout)
    assert bytes.fromhex(seen["read"]) == data
    assert seen["status"]["stats"]["read_ops"] >= 1  # blkfs served the reads
    assert seen["status"]["passthrough"]["open"] == 0
    # on a kernel with passthrough: "the kernel requires CAP_SYS_ADMIN, which the daemon
    # lacks"; on one without: "the kernel has no FUSE passthrough (it needs Linux 6.9+)"
    assert "FUSE passthrough: the kernel " in seen["log"]
    assert "d0: opened without passthrough: the kernel " in seen["log"]
