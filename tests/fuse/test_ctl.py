"""Every .ctl command through a real mount, and every error case with the state unchanged."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fuse
from tests.helpers import Mount, errno_of, pattern_image

pytestmark = [needs_fuse, pytest.mark.fuse]
MiB = 1 << 20


def listing(mount: Mount) -> list[str]:
    return sorted(os.listdir(mount.path))


def snapshot(mount: Mount) -> tuple[list[str], list[tuple]]:
    """What a failed command must not change: the files and every backend's medium."""
    return listing(mount), [
        (b["name"], b["medium"], b["size"], b["read-only"], b["tree"] and b["tree"]["node-name"])
        for b in mount.status()["backends"]
    ]


@pytest.fixture
def two_images(images: Path) -> tuple[Path, Path]:
    a, b = images / "a.img", images / "b.img"
    pattern_image(a, 2 * MiB, image_id=1)
    pattern_image(b, 3 * MiB, image_id=2)
    return a, b


def test_create_change_eject_insert_delete(mount: Mount, two_images) -> None:
    a, b = two_images
    subprocess.run(f"echo 'disk0 {a}' > {mount.path}/.ctl/create", shell=True, check=True)
    assert listing(mount) == [".ctl", "disk0"]
    assert (mount / "disk0").read_bytes() == a.read_bytes()

    mount.ctl("change", f"disk0 {b}\n")
    assert os.stat(mount / "disk0").st_size == 3 * MiB
    assert (mount / "disk0").read_bytes() == b.read_bytes()

    mount.ctl("eject", "disk0")
    assert os.stat(mount / "disk0").st_size == 0
    assert errno_of(os.open, mount / "disk0", os.O_RDONLY) == errno.ENOMEDIUM
    assert mount.backends()["disk0"]["medium"] is False

    mount.ctl("insert", f"disk0 driver=raw,file.driver=file,file.filename={a}")
    assert (mount / "disk0").read_bytes() == a.read_bytes()

    mount.ctl("delete", "disk0")
    assert listing(mount) == [".ctl"]
    assert a.exists() and b.exists()


def test_create_empty_drive_then_insert(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl("create", "cd0")
    assert os.stat(mount / "cd0").st_size == 0
    assert mount.backends()["cd0"]["medium"] is False
    mount.ctl("insert", f"cd0 {a},read-only=on")
    assert os.stat(mount / "cd0").st_mode & 0o777 == 0o444
    assert (mount / "cd0").read_bytes() == a.read_bytes()


FAILING_COMMANDS = [
    ("create", "disk0 /nonexistent/image.img", errno.ENOENT),
    ("create", "disk0 driver=raw,file.driver=file,file.filename=%A,bogus=1", errno.EINVAL),
    ("create", "disk0 driver=nosuch", errno.EINVAL),
    ("create", "dup %A", errno.EEXIST),
    ("create", "../evil %A", errno.EINVAL),
    ("create", "\n", errno.EINVAL),
    ("change", "missing %A", errno.ENOENT),
    ("change", "dup /nonexistent.img", errno.ENOENT),
    ("change", "dup driver=raw,offset=banana,file.driver=file,file.filename=%A", errno.EINVAL),
    ("change", "dup", errno.EINVAL),
    ("eject", "missing", errno.ENOENT),
    ("eject", "empty", errno.ENOMEDIUM),
    ("insert", "dup %A", errno.EBUSY),
    ("insert", "empty /nonexistent.img", errno.ENOENT),
    ("delete", "missing", errno.ENOENT),
    ("delete", "dup extra-argument", errno.EINVAL),
    ("create", b"bad\xff\xfe utf8", errno.EINVAL),
    ("create", b"nul\x00byte", errno.EINVAL),
    ("create", "two\nlines", errno.EINVAL),
    ("reopen", "nosuchnode read-only=on", errno.ENOENT),
]


def test_failed_commands_change_nothing(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl("create", f"dup {a}")
    mount.ctl("create", "empty")
    before = snapshot(mount)
    for verb, text, code in FAILING_COMMANDS:
        payload = text.replace("%A", str(a)) if isinstance(text, str) else text
        assert (verb, text, mount.ctl_errno(verb, payload)) == (verb, text, code)
        assert snapshot(mount) == before, (verb, text)
        assert mount.last_error().startswith(verb), (verb, text)
    assert (mount / "dup").read_bytes() == a.read_bytes()


def test_image_dir_allowlist(mount_factory, images: Path, tmp_path: Path) -> None:
    inside = images / "in.img"
    pattern_image(inside, MiB, image_id=3)
    outside = tmp_path / "out.img"
    pattern_image(outside, MiB, image_id=4)
    (images / "link.img").symlink_to(outside)
    mount = mount_factory("--image-dir", str(images))
    mount.ctl("create", f"ok {inside}")
    before = snapshot(mount)
    for path in (outside, images / "link.img", images / ".." / outside.name):
        assert mount.ctl_errno("create", f"bad {path}") == errno.EACCES
        assert mount.ctl_errno("change", f"ok {path}") == errno.EACCES
    assert snapshot(mount) == before
    assert "outside the image directories" in mount.last_error()


def test_write_to_read_only_media(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl("create", f"ro {a},read-only=on")
    data = a.read_bytes()
    assert errno_of(os.open, mount / "ro", os.O_RDWR) == errno.EROFS
    assert a.read_bytes() == data


def test_media_change_is_seen_by_an_fd_opened_before(mount: Mount, two_images) -> None:
    a, b = two_images
    mount.ctl("create", f"cd {a}")
    with open(mount / "cd", "rb", buffering=0) as f:
        assert f.read(16) == a.read_bytes()[:16]
        mount.ctl("change", f"cd {b}")
        f.seek(0)
        assert f.read(16) == b.read_bytes()[:16]
        f.seek(2 * MiB + 4096)  # beyond the old medium's end
        assert f.read(16) == b.read_bytes()[2 * MiB + 4096 : 2 * MiB + 4112]
        mount.ctl("eject", "cd")
        f.seek(0)
        assert errno_of(f.read, 16) == errno.ENOMEDIUM
        mount.ctl("insert", f"cd {a}")
        f.seek(0)
        assert f.read(16) == a.read_bytes()[:16]


def test_delete_with_an_open_fd_keeps_it_working(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl("create", f"d {a}")
    with open(mount / "d", "r+b", buffering=0) as f:
        assert mount.ctl_errno("delete", "d") == errno.EBUSY  # a writer: only with force=on
        assert "d" in listing(mount)
        mount.ctl("delete", "d force=on")
        assert "d" not in listing(mount)
        assert errno_of(os.stat, mount / "d") == errno.ENOENT
        f.seek(100)
        f.write(b"after delete")
        f.seek(0)
        assert f.read(16) == a.read_bytes()[:16]
    assert a.read_bytes()[100:112] == b"after delete"


def test_rm_deletes_the_backend_not_the_image(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl("create", f"gone {a}")
    os.unlink(mount / "gone")
    assert listing(mount) == [".ctl"]
    assert a.exists()
    assert errno_of(os.unlink, mount / "gone") == errno.ENOENT


def test_status_shows_the_tree(mount: Mount, two_images) -> None:
    a, _ = two_images
    mount.ctl(
        "create",
        f"disk0 driver=raw,node-name=fmt0,file.driver=file,file.filename={a},file.node-name=proto0",
    )
    text = (mount / ".ctl" / "status").read_text()
    assert "disk0" in text and "fmt0" in text and "proto0" in text and str(a) in text
    tree = mount.backends()["disk0"]["tree"]
    assert tree["driver"] == "raw" and tree["children"]["file"]["node-name"] == "proto0"


def test_creating_files_directly_is_refused(mount: Mount) -> None:
    assert errno_of(os.open, mount / "newfile", os.O_CREAT | os.O_WRONLY) == errno.EPERM
    assert listing(mount) == [".ctl"]


def test_reopen_turns_on_zero_detection_live(mount: Mount, images: Path) -> None:
    image = images / "z.img"
    image.write_bytes(os.urandom(4 * MiB))
    mount.ctl("create", f"z driver=raw,node-name=zfmt,file.driver=file,file.filename={image}")
    before = snapshot(mount)
    assert mount.ctl_errno("reopen", "zfmt offset=4096") == errno.EINVAL
    assert mount.ctl_errno("reopen", "zfmt detect-zeroes=sometimes") == errno.EINVAL
    assert snapshot(mount) == before
    mount.ctl("reopen", "zfmt detect-zeroes=unmap")
    assert mount.backends()["z"]["tree"]["options"]["detect-zeroes"] == "unmap"
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={mount / 'z'}",
            "bs=1M",
            "count=2",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )
    assert image.stat().st_blocks * 512 <= 2 * MiB + 64 * 1024  # the zeroed half was punched
    assert (mount / "z").read_bytes()[: 2 * MiB] == bytes(2 * MiB)


def test_reopen_switches_a_backend_read_only_and_back(mount: Mount, images: Path) -> None:
    image = images / "r.img"
    image.write_bytes(bytes(MiB))
    mount.ctl("create", f"r driver=raw,node-name=rfmt,file.driver=file,file.filename={image}")
    disk = mount / "r"
    mount.ctl("reopen", "rfmt read-only=on")
    assert disk.stat().st_mode & 0o777 == 0o444
    assert errno_of(os.open, disk, os.O_WRONLY) == errno.EROFS
    assert mount.backends()["r"]["read-only"]
    mount.ctl("reopen", "rfmt read-only=off")
    assert disk.stat().st_mode & 0o777 == 0o644
    subprocess.run(
        [
            "dd",
            "if=/dev/urandom",
            f"of={disk}",
            "bs=64k",
            "count=1",
            "conv=notrunc,fsync",
            "status=none",
        ],
        check=True,
    )
    assert disk.read_bytes()[:65536] == image.read_bytes()[:65536] != bytes(65536)


def test_on_change_error_makes_old_descriptors_stale(mount: Mount, two_images) -> None:
    """A reader that must never mix two media asks for ESTALE after a change (a drive's
    users follow the new medium by default, as the test above shows)."""
    a, b = two_images
    mount.ctl("create", f"cd {a},read-only=on,on-change=error")
    status = mount.backends()["cd"]
    assert status["on-change"] == "error" and status["generation"] == 1
    mtime = os.stat(mount / "cd").st_mtime_ns
    with open(mount / "cd", "rb", buffering=0) as old:
        assert old.read(16) == a.read_bytes()[:16]
        mount.ctl("change", f"cd {b},read-only=on")
        assert errno_of(old.read, 16) == errno.ESTALE
        with open(mount / "cd", "rb", buffering=0) as new:  # opened again: the new medium
            assert new.read(16) == b.read_bytes()[:16]
        assert errno_of(old.read, 16) == errno.ESTALE
    assert mount.backends()["cd"]["generation"] == 2
    assert os.stat(mount / "cd").st_mtime_ns > mtime
    mount.ctl("create", "empty on-change=error")
    assert mount.backends()["empty"]["medium"] is False
    assert mount.ctl_errno("create", "bad on-change=sometimes") == errno.EINVAL


def test_throttle_in_retuned_and_out(mount: Mount, two_images) -> None:
    """``.ctl/throttle`` puts a throttle filter in front of the medium, retunes it in place,
    takes it out when every limit is 0; the data stays, refused limits change nothing."""
    a, _ = two_images
    mount.ctl("create", f"disk0 driver=raw,node-name=img,file.driver=file,file.filename={a}")
    mount.ctl("create", "empty")
    mount.ctl("throttle", "disk0 bps-write=8M")
    tree = mount.backends()["disk0"]["tree"]
    assert tree["driver"] == "throttle" and tree["children"]["file"]["node-name"] == "img"
    assert tree["info"]["limits"] == {"bps-write": 8 * MiB}
    assert (mount / "disk0").read_bytes() == a.read_bytes()

    mount.ctl("throttle", "disk0 iops-total=100 iops-total-max=200 iops-total-max-length=2")
    again = mount.backends()["disk0"]["tree"]
    assert again["node-name"] == tree["node-name"]  # the same filter, retuned
    assert again["info"]["limits"] == {"iops-total": 100}

    before = snapshot(mount)
    for bad, code in (
        ("disk0 bps-total=1 bps-read=1", errno.EINVAL),  # total with read: the filter's rule
        ("disk0 bps-total=2 bps-total-max=1", errno.EINVAL),
        ("disk0 bps-total=1 bps-total-max-length=0", errno.EINVAL),
        ("disk0 iops-total=-1", errno.EINVAL),
        ("disk0 speed=1", errno.EINVAL),
        ("nosuch bps-total=1", errno.ENOENT),
        ("empty bps-total=1", errno.ENOMEDIUM),
    ):
        assert (bad, mount.ctl_errno("throttle", bad)) == (bad, code)
        assert mount.last_error().startswith("throttle"), bad
    assert snapshot(mount) == before
    assert mount.backends()["disk0"]["tree"]["info"]["limits"] == {"iops-total": 100}

    mount.ctl("throttle", "disk0")
    assert mount.backends()["disk0"]["tree"]["node-name"] == "img"
    mount.ctl("throttle", "disk0")  # nothing to take out
    assert mount.backends()["disk0"]["tree"]["node-name"] == "img"
    assert (mount / "disk0").read_bytes() == a.read_bytes()
