"""The NBD export of a real mount against real clients: qemu-io, qemu-img, nbdinfo, nbdcopy
and the kernel's nbd-client, with the FUSE file of the same backend as the reference; and
the FUSE file's semantics over NBD (media changes, no medium, read-only, deletes, stats)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blkfs import nbd
from tests.compat.peers import MiB, convert, run
from tests.conftest import needs_fuse
from tests.helpers import Mount, errno_of, loop_device, wait_until
from tests.nbdpeers import NbdClient, nbd_map, needs_nbd_tools, qemu_map

pytestmark = [needs_nbd_tools, needs_fuse, pytest.mark.fuse, pytest.mark.qemu]
SIZE = 8 * MiB


@pytest.fixture
def served(tmp_path: Path, mount_factory) -> tuple[Mount, Path, Path]:
    """A mount with backend d (a qcow2 image with data, zeros and holes) exported writable on
    the mount's NBD server, and backend ro exported read-only on a socket of its own."""
    image = convert(tmp_path, "disk", size=SIZE)
    ro = convert(tmp_path, "ro", size=SIZE)
    sock = tmp_path / "nbd.sock"
    mount = mount_factory(
        "--backend",
        f"d={image}",
        "--backend",
        f"ro={ro},read-only=on",
        "--nbd",
        f"unix:{sock}",
        "--export",
        "d writable=on",
    )
    mount.ctl("export", f"ro socket={tmp_path / 'ro.sock'}")
    return mount, image, sock


def uri(sock: Path, export: str = "d") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def test_qemu_io_and_qemu_img_see_what_the_fuse_file_holds(served) -> None:
    mount, image, sock = served
    run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 100000 300000",
        "-c",
        "write -z 2M 64k",
        "-c",
        "read -P 0x5a 100000 300000",
        "-c",
        "flush",
        uri(sock),
    )
    assert (
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), mount / "d").returncode == 0
    )
    copy = image.with_name("copy.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock), copy)
    assert copy.read_bytes() == (mount / "d").read_bytes()
    fresh = convert(image.parent, "fresh", size=SIZE)
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", fresh, uri(sock))
    assert (
        run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", fresh, mount / "d").returncode
        == 0
    )


def test_nbdinfo_map_matches_qemu_img_map(served) -> None:
    _, image, sock = served
    assert nbd_map(uri(sock)) == qemu_map(image, "qcow2")
    # --no-content: nbdinfo probes the first sectors with file(1) otherwise, and where file(1)
    # is missing it puts raw bytes in "content" that are not UTF-8.
    info = json.loads(run("nbdinfo", "--json", "--no-content", uri(sock)).stdout)
    export = info["exports"][0]
    assert (
        export["export-size"],
        export["can_zero"],
        export["can_fast_zero"],
        export["can_multi_conn"],
        export["contexts"],
    ) == (SIZE, True, True, True, ["base:allocation"])


def test_nbdcopy_both_ways(served, tmp_path: Path) -> None:
    mount, _, sock = served
    out = tmp_path / "out.raw"
    run("nbdcopy", uri(sock), out)
    assert out.read_bytes() == (mount / "d").read_bytes()
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(MiB) + bytes(SIZE - 2 * MiB) + os.urandom(MiB))
    run("nbdcopy", src, uri(sock))  # fast zero first, several connections
    assert (mount / "d").read_bytes() == src.read_bytes()


@pytest.mark.kernel_module("nbd")
def test_the_kernels_nbd_client(served, tmp_path: Path) -> None:
    if not os.path.exists("/dev/nbd0") and shutil.which("modprobe"):
        subprocess.run(["modprobe", "nbd"], capture_output=True)
    if shutil.which("nbd-client") is None or not os.path.exists("/dev/nbd0"):
        pytest.skip(
            "the kernel's NBD client is not available here: nbd-client is not "
            "installed or the nbd module does not load (no /dev/nbd0 after "
            "modprobe nbd)"
        )
    mount, _, sock = served
    run("nbd-client", "-unix", sock, "/dev/nbd0", "-N", "d", "-b", "512")
    try:
        with open("/dev/nbd0", "rb") as device:
            assert device.read(SIZE) == (mount / "d").read_bytes()
    finally:
        run("nbd-client", "-d", "/dev/nbd0", check=False)


def test_sockets_are_private_unless_told_and_list_their_exports(served, tmp_path: Path) -> None:
    mount, _, sock = served
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ro.sock").st_mode) == 0o600
    mount.ctl("export", f"d export-name=shared socket={tmp_path / 'g.sock'} mode=0660")
    assert stat.S_IMODE(os.stat(tmp_path / "g.sock").st_mode) == 0o660
    listed = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["d"]
    mount.ctl("export-del", "shared")
    assert not (tmp_path / "g.sock").exists()  # a socket of its own goes with the export


def test_read_only_and_no_medium(served, tmp_path: Path) -> None:
    mount, _, _ = served
    ro = tmp_path / "ro.sock"
    result = run("qemu-io", "-f", "raw", "-c", "write 0 512", uri(ro, "ro"), check=False)
    assert result.returncode and "Permission denied" in result.stderr  # the flag said so
    client = NbdClient(ro, "ro")
    try:
        refused = client.request(nbd.Cmd.WRITE, 0, 512, data=bytes(512))
        assert refused.error == errno.EPERM  # a client that writes anyway
        data = client.read(0, 4096)
        mount.ctl("eject", "ro")
        with pytest.raises(OSError) as gone:
            client.read(0, 4096)
        assert gone.value.errno == errno.EIO and "no medium" in str(gone.value)
        assert run("nbdinfo", uri(ro, "ro"), check=False).returncode
        with pytest.raises(nbd.Refused, match="ro: no medium"):
            NbdClient(ro, "ro")
        mount.ctl("insert", f"ro {tmp_path / 'ro.qcow2'},read-only=on")
        assert client.read(0, 4096) == data  # the same connection, the new medium
    finally:
        client.close()


def test_a_writable_client_is_a_writer_and_a_change_is_drained(served, tmp_path: Path) -> None:
    mount, _, sock = served
    client = NbdClient(sock, "d")
    try:
        assert mount.backends()["d"]["writers"] == 1
        assert mount.ctl_errno("eject", "d") == errno.EBUSY
        other = convert(tmp_path, "other", size=SIZE)
        assert mount.ctl_errno("change", f"d {other}") == errno.EBUSY
        mount.ctl("change", f"d {other},force=on")
        assert client.read(0, SIZE) == (mount / "d").read_bytes()
    finally:
        client.close()
    wait_until(lambda: mount.backends()["d"]["writers"] == 0, "the client to leave")


def test_a_deleted_backend_serves_its_clients_until_they_leave(served) -> None:
    mount, _, sock = served
    client = NbdClient(sock, "d")
    try:
        before = client.read(0, 65536)
        assert mount.ctl_errno("delete", "d") == errno.EBUSY  # a client of a writable export
        assert "open for writing" in mount.last_error() and (mount.path / "d").exists()
        mount.ctl("delete", "d force=on")
        assert not (mount.path / "d").exists()
        export = next(e for e in mount.status()["exports"] if e["name"] == "d")
        assert export["retired"] and len(export["clients"]) == 1
        assert client.read(0, 65536) == before
        result = run("nbdinfo", uri(sock), check=False)
        assert result.returncode  # no longer offered
    finally:
        client.close()
    wait_until(
        lambda: (
            "d" not in mount.backends() and [e["name"] for e in mount.status()["exports"]] == ["ro"]
        ),
        "the deleted backend to close",
    )


def test_export_del_refuses_while_clients_are_connected(served) -> None:
    mount, _, sock = served
    client = NbdClient(sock, "d")
    try:
        before = mount.status()
        assert mount.ctl_errno("export-del", "d") == errno.EBUSY
        assert "has clients" in mount.last_error()
        assert mount.status()["exports"] == before["exports"]
        mount.ctl("export-del", "d force=on")
        with pytest.raises((OSError, EOFError)):
            client.read(0, 512)
    finally:
        client.close()
    assert [e["name"] for e in mount.status()["exports"]] == ["ro"]


def test_status_shows_exports_clients_and_counters(served) -> None:
    mount, _, sock = served
    client = NbdClient(sock, "d")
    try:
        client.read(0, 4096)
        client.request(nbd.Cmd.WRITE, 0, 512, data=b"x" * 512)
        export = next(e for e in mount.status()["exports"] if e["name"] == "d")
        assert export["backend"] == "d" and export["writable"]
        assert export["address"] == f"unix:{sock}"
        assert export["clients"][0]["peer"].startswith("pid ")
        assert export["stats"]["read_ops"] >= 1 and export["stats"]["write_bytes"] == 512
        text = (mount.path / ".ctl" / "status").read_text()
        assert "EXPORT" in text and f"unix:{sock}" in text and "d: client pid" in text
    finally:
        client.close()


@pytest.mark.parametrize(
    "command, code",
    [
        ("nosuch", errno.ENOENT),
        ("d", errno.EEXIST),  # already exported as d
        ("d export-name=x socket=relative.sock", errno.EINVAL),
        ("d export-name=x socket=/tmp/a.sock host=::1", errno.EINVAL),
        ("d export-name=x port=10809", errno.EINVAL),  # listens only where told
        ("d export-name=x mode=0660", errno.EINVAL),
        ("ro export-name=x writable=on", errno.EROFS),
        ("d export-name=x socket=/nonexistent/dir/s", errno.ENOENT),
    ],
)
def test_bad_export_commands_fail_and_change_nothing(served, command: str, code: int) -> None:
    mount, _, _ = served
    before = mount.status()["exports"]
    assert mount.ctl_errno("export", command) == code
    assert mount.status()["exports"] == before
    assert mount.ctl_errno("export-del", "nosuch") == errno.ENOENT


def test_a_loop_device_over_the_fuse_file_and_the_export_agree(served) -> None:
    """The same backend through two frontends at once: what one writes the other reads."""
    mount, _, sock = served
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    with loop_device(mount / "d") as device:
        with open(device, "r+b", buffering=0) as f:
            f.write(b"L" * 4096)
            os.fsync(f.fileno())
        client = NbdClient(sock, "d")
        try:
            assert client.read(0, 4096) == b"L" * 4096
        finally:
            client.close()
        run("qemu-io", "-f", "raw", "-c", "write -P 0x4e 8192 4096", uri(sock))
        with open(device, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(8192)
            assert f.read(4096) == b"N" * 4096
    assert errno_of(os.stat, mount / "d") == 0


def test_umount_refuses_while_clients_are_connected_and_names_them(served) -> None:
    mount, _, sock = served
    client = NbdClient(sock, "d")
    try:
        result = run(sys.executable, "-m", "blkfs", "umount", mount.path, check=False)
        assert result.returncode == 1
        assert "NBD clients of export 'd': pid " in result.stderr
        assert "export-del d force=on" in result.stderr
        assert mount.alive()
    finally:
        client.close()


def test_blkfs_ctl_makes_a_relative_socket_absolute(served, tmp_path: Path) -> None:
    mount, _, _ = served
    subprocess.run(
        [
            sys.executable,
            "-m",
            "blkfs",
            "ctl",
            str(mount.path),
            "export",
            "d",
            "export-name=rel",
            "socket=rel.sock",
        ],
        cwd=tmp_path,
        check=True,
    )
    assert stat.S_ISSOCK(os.stat(tmp_path / "rel.sock").st_mode)
