"""Who may reach a mount, which host files it may open, and what a guest cannot make it open.

Another user is ``nobody``, reached with ``setpriv``; the mounts live in a directory every
user may traverse, so that an EACCES comes from blkfs and the kernel's FUSE checks, not from
the path. ``--image-dir`` is attacked with ``..``, symlinks to files and directories, a
symlink swapped in and out in a loop while backends are opened, and backing files named
inside qcow2 images. A guest that writes a qcow2 header into its raw disk must not make
blkfs open a backing file of the guest's choosing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blkfs_drivers.qcow2.create import write_image

from tests.conftest import needs_fuse
from tests.helpers import Mount, mounts_in, pattern_image, without_stats

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.stress]
needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3") or os.getuid() != 0,
    reason="needs root, setpriv and /usr/bin/python3 to act as nobody",
)
MiB = 1 << 20
NOBODY = 65534

AS_OTHER = r"""
import errno, json, os, sys
mnt = sys.argv[1]
def attempt(op, *args):
    try:
        op(*args)
        return 0
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)
def read(path):
    with open(path, "rb") as f:
        f.read(4096)
def open_write(path):
    os.close(os.open(path, os.O_WRONLY))
def command(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)
print(json.dumps({
    "stat": attempt(os.stat, mnt),
    "ls": attempt(os.listdir, mnt),
    "read disk": attempt(read, f"{mnt}/disk"),
    "write disk": attempt(open_write, f"{mnt}/disk"),
    "truncate disk": attempt(os.truncate, f"{mnt}/disk", 0),
    "rm disk": attempt(os.unlink, f"{mnt}/disk"),
    "ls .ctl": attempt(os.listdir, f"{mnt}/.ctl"),
    "create": attempt(command, f"{mnt}/.ctl/create", b"evil driver=null"),
    "delete": attempt(command, f"{mnt}/.ctl/delete", b"disk"),
    "status.json": attempt(read, f"{mnt}/.ctl/status.json"),
}))
"""


@pytest.fixture
def public_mounts(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Like mount_factory, but the mountpoints are in a directory other users may traverse."""
    base = Path(tempfile.mkdtemp(prefix="blkfs-sec-", dir="/tmp"))
    base.chmod(0o755)
    try:
        with mounts_in(base) as start:
            yield start
    finally:
        shutil.rmtree(base, ignore_errors=True)


def shape(value: Any) -> Any:
    """status.json without the statistics (another user's reads count there)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k != "stats"}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return value


def as_nobody(mount: Mount) -> dict[str, Any]:
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            AS_OTHER,
            str(mount.path),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


@needs_setpriv
def test_other_users_get_eacces_without_allow_other(public_mounts, images: Path) -> None:
    pattern_image(images / "disk.img", MiB, image_id=1)
    mount = public_mounts("--backend", f"disk={images / 'disk.img'}")
    before = mount.status()
    seen = as_nobody(mount)
    assert seen == {op: "EACCES" for op in seen}, seen
    assert mount.status() == before
    assert os.stat(mount.path.parent).st_mode & 0o005 == 0o005  # the path was not the obstacle


@needs_setpriv
def test_ctl_is_the_mounting_users_even_with_allow_other(public_mounts, images: Path) -> None:
    pattern_image(images / "disk.img", MiB, image_id=1)
    mount = public_mounts("--allow-other", "--backend", f"disk={images / 'disk.img'}")
    before = shape(mount.status())
    seen = as_nobody(mount)
    assert seen == {
        "stat": 0,
        "ls": 0,
        "read disk": 0,
        "write disk": "EACCES",
        "truncate disk": "EACCES",
        "rm disk": "EACCES",
        "ls .ctl": "EACCES",
        "create": "EACCES",
        "delete": "EACCES",
        "status.json": "EACCES",
    }
    assert shape(mount.status()) == before
    ctl = mount.path / ".ctl"
    assert os.stat(ctl).st_mode & 0o777 == 0o700
    modes = {name: os.stat(ctl / name).st_mode & 0o777 for name in os.listdir(ctl)}
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert modes["create"] == 0o600 and modes["status.json"] == 0o400


# -- --image-dir ---------------------------------------------------------------------------


@pytest.fixture
def jail(tmp_path: Path) -> dict[str, Path]:
    """An image directory with a good image, and secrets around it."""
    inside, outside, sibling = tmp_path / "img", tmp_path / "out", tmp_path / "img-evil"
    inside.mkdir(exist_ok=True)
    outside.mkdir()
    sibling.mkdir()
    pattern_image(inside / "good.img", MiB, image_id=1)
    pattern_image(outside / "secret.img", MiB, image_id=9)
    pattern_image(sibling / "secret.img", MiB, image_id=9)
    (inside / "link.img").symlink_to(outside / "secret.img")
    (inside / "rel-link.img").symlink_to("../out/secret.img")
    (inside / "linkdir").symlink_to(outside)
    (inside / "good-link.img").symlink_to("good.img")
    return {"in": inside, "out": outside, "sibling": sibling}


def qcow2_over(path: Path, backing: str, fmt: str | None = "raw") -> Path:
    """A 1 MiB qcow2 overlay whose header names ``backing`` (and ``fmt``, unless None),
    laid out by blkfs's own qcow2 code, which, unlike qemu-img 7.2, can leave the format out
    and never looks at the backing file."""
    with open(path, "xb") as out:
        write_image(out, MiB, {}, backing, fmt)
    return path


def secret_leaked(mount: Mount) -> bool:
    return any(
        b"img0009" in (mount / name).read_bytes()
        for name in mount.backends()
        if mount.backends()[name]["medium"]
    )


def test_image_dir_holds_against_dotdot_and_symlinks(mount_factory, jail) -> None:
    inside, outside = jail["in"], jail["out"]
    mount = mount_factory("--image-dir", str(inside), "--backend", f"ok={inside / 'good.img'}")
    before = without_stats(mount.status())
    escapes = [
        inside / ".." / "out" / "secret.img",
        f"{inside}/./../out/secret.img",
        f"{inside}//..//out//secret.img",
        inside / "link.img",
        inside / "rel-link.img",
        inside / "linkdir" / "secret.img",
        jail["sibling"] / "secret.img",  # a prefix of the image dir is not inside
        f"/proc/self/root{outside}/secret.img",
        outside / "secret.img",
    ]
    spellings = [
        "{p}",
        "{p},read-only=on",
        "driver=raw,file.driver=file,file.filename={p}",
        '{{"driver": "raw", "file": {{"driver": "file", "filename": "{p}"}}}}',
    ]
    mount.ctl("create", "empty")
    for path in escapes:
        for spelling in spellings:
            options = spelling.format(p=path)
            assert mount.ctl_errno("create", f"x {options}") == errno.EACCES, options
            assert mount.ctl_errno("change", f"ok {options}") == errno.EACCES, options
            assert mount.ctl_errno("insert", f"empty {options}") == errno.EACCES, options
    assert mount.ctl_errno("create", f"x {inside}") == errno.EINVAL  # a directory
    mount.ctl("delete", "empty")
    assert without_stats(mount.status()) == before
    mount.ctl("create", f"alias {inside / 'good-link.img'},read-only=on")  # inside: fine
    assert (mount / "alias").read_bytes()[:7] == b"img0001"
    assert not secret_leaked(mount)


def test_backing_files_named_inside_images_obey_the_image_dir(mount_factory, jail) -> None:
    inside, outside = jail["in"], jail["out"]
    secret = str(outside / "secret.img")
    pattern_image(inside / "base.img", MiB, image_id=2)
    evil = [
        qcow2_over(inside / "abs.qcow2", secret),
        qcow2_over(inside / "rel.qcow2", "../out/secret.img"),
        qcow2_over(inside / "sym.qcow2", "link.img"),
        qcow2_over(inside / "symdir.qcow2", "linkdir/secret.img"),
        qcow2_over(inside / "probed.qcow2", secret, fmt=None),
        qcow2_over(inside / "as-file.qcow2", secret, fmt="file"),
        qcow2_over(inside / "proc.qcow2", f"/proc/self/root{secret}"),
        qcow2_over(
            inside / "json.qcow2",
            f'json:{{"driver": "raw", "file": {{"driver": "file", "filename": "{secret}"}}}}',
            fmt=None,
        ),
    ]
    # deeper: inside -> inside -> outside
    qcow2_over(inside / "mid.qcow2", secret)
    evil.append(qcow2_over(inside / "top.qcow2", "mid.qcow2", fmt="qcow2"))
    good = qcow2_over(inside / "good.qcow2", "base.img")
    mount = mount_factory("--image-dir", str(inside), "--backend", f"ok={good}")
    assert (mount / "ok").read_bytes()[:7] == b"img0002"  # backing files inside: fine
    before = without_stats(mount.status())
    for image in evil:
        code = mount.ctl_errno("create", f"x {image}")
        if image.name == "json.qcow2":  # blkfs takes no json: names: a missing file
            assert code in (errno.EACCES, errno.ENOENT), (image, code)
        elif image.name == "as-file.qcow2":  # format "file" takes no file child
            assert code in (errno.EACCES, errno.EINVAL), (image, code)
        else:
            assert code == errno.EACCES, (image, code)
        assert mount.ctl_errno("change", f"ok {image},read-only=on") == code, image
    unused = qcow2_over(inside / "unused.qcow2", "base.img")  # good.qcow2 is written by ok
    user_backing = (
        f"x driver=qcow2,read-only=on,file.driver=file,file.filename={unused},"
        f"backing.driver=raw,backing.file.driver=file,backing.file.filename={secret}"
    )
    assert mount.ctl_errno("create", user_backing) == errno.EACCES
    assert without_stats(mount.status()) == before
    assert not secret_leaked(mount)


FLIPPER = r"""
import os, shutil, sys
inside, race, secret, stop = sys.argv[1:]
flips = 0
while not os.path.exists(stop):
    os.symlink(secret, f"{inside}/.race-link")
    os.replace(f"{inside}/.race-link", race)
    shutil.copyfile(f"{inside}/good.img", f"{inside}/.race-file")  # one link: may be opened
    os.replace(f"{inside}/.race-file", race)
    flips += 1
print(flips)
"""


def test_a_symlink_swapped_in_after_the_check_is_refused(
    mount_factory,
    jail,
    tmp_path: Path,
    figures: dict[str, Any],
    stress_seconds: Callable[[float], float],
) -> None:
    """race.img flips between a copy of good.img and a symlink to the secret as fast as the
    host allows, while backends open it (directly, and as a qcow2 backing file)."""
    inside, outside = jail["in"], jail["out"]
    race = inside / "race.img"
    shutil.copyfile(inside / "good.img", race)
    overlay = qcow2_over(inside / "race-overlay.qcow2", "race.img")
    mount = mount_factory("--image-dir", str(inside))
    stop = tmp_path / "stop"
    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FLIPPER,
            str(inside),
            str(race),
            str(outside / "secret.img"),
            str(stop),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    outcomes = {"opened": 0, "refused": 0}
    try:
        attempts = int(300 * stress_seconds(10) / 10)
        for i in range(attempts):
            target = overlay if i % 2 else race
            name = f"r{i}"  # a new name each time: see test_many_backends' recreate test
            code = mount.ctl_errno("create", f"{name} {target},read-only=on")
            if code == 0:
                outcomes["opened"] += 1
                assert (mount / name).read_bytes()[:7] == b"img0001"
                mount.ctl("delete", name)
            else:
                assert code == errno.EACCES, (target, code, mount.last_error())
                outcomes["refused"] += 1
    finally:
        stop.touch()
        flips = int(flipper.communicate(timeout=60)[0] or 0)
    figures.update(attempts=attempts, flips=flips, **outcomes)
    assert list(mount.backends()) == []
    assert outcomes["opened"] + outcomes["refused"] == attempts


# -- a guest writing a qcow2 header into its raw disk -----------------------------------------


def tree_drivers(tree: dict[str, Any] | None) -> list[str]:
    if tree is None:
        return []
    return [tree["driver"]] + [d for c in tree["children"].values() for d in tree_drivers(c)]


@pytest.fixture
def evil_header(tmp_path: Path) -> bytes:
    """A qcow2 image whose backing file is the host's secret: what a guest would write."""
    secret = tmp_path / "secret.img"
    pattern_image(secret, MiB, image_id=9)
    return qcow2_over(tmp_path / "evil.qcow2", str(secret)).read_bytes()


def guest_writes(mount: Mount, name: str, data: bytes) -> int:
    """What a guest's write of ``data`` at the start of its disk gets: 0 or an errno."""
    try:
        with open(mount / name, "r+b", buffering=0) as disk:
            disk.write(data)
            os.fsync(disk.fileno())
    except OSError as exc:
        return exc.errno or -1
    return 0


def assert_raw(mount: Mount, name: str, size: int, first: bytes) -> None:
    backend = mount.backends()[name]
    assert tree_drivers(backend["tree"]) == ["raw", "file"], backend["tree"]
    assert backend["size"] == size
    data = (mount / name).read_bytes()
    assert data.startswith(first[:64]) and b"img0009" not in data


def test_a_probed_raw_image_refuses_a_qcow2_header_from_its_guest(
    mount_factory, images: Path, evil_header: bytes
) -> None:
    disk, other = images / "disk.img", images / "other.img"
    original = pattern_image(disk, 4 * MiB, image_id=1)
    pattern_image(other, MiB, image_id=2)
    (images / "alias.img").symlink_to("disk.img")
    mount = mount_factory()  # no --image-dir: the probe rule is the only defence
    mount.ctl("create", f"vm {disk}")
    assert tree_drivers(mount.backends()["vm"]["tree"]) == ["raw", "file"]
    for header in (evil_header[:512], evil_header[:100], evil_header):
        assert guest_writes(mount, "vm", header) == errno.EPERM
    assert disk.read_bytes() == original
    assert guest_writes(mount, "vm", b"an ordinary boot sector") == 0
    size = 4 * MiB

    mount.ctl("change", f"vm {other}")
    mount.ctl("change", f"vm {disk}")
    assert_raw(mount, "vm", size, b"an ordinary boot sector")
    mount.ctl("eject", "vm")
    mount.ctl("insert", f"vm {images / 'alias.img'}")
    assert_raw(mount, "vm", size, b"an ordinary boot sector")
    assert guest_writes(mount, "vm", evil_header) == errno.EPERM


def test_a_named_raw_disk_takes_any_data_and_stays_raw_when_named_again(
    mount_factory, images: Path, evil_header: bytes
) -> None:
    """``driver=raw`` is the safe way for a guest-writable disk: the guest may write
    anything, and naming the format again keeps it raw."""
    disk = images / "disk.img"
    pattern_image(disk, 4 * MiB, image_id=1)
    mount = mount_factory()
    named = f"driver=raw,file.driver=file,file.filename={disk}"
    mount.ctl("create", f"vm {named}")
    assert guest_writes(mount, "vm", evil_header) == 0
    mount.ctl("eject", "vm")
    mount.ctl("insert", f"vm {named}")
    assert_raw(mount, "vm", 4 * MiB, evil_header)
