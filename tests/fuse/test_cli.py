"""The blkfs command: mount errors, config files, ctl, umount of busy and dead mounts."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from blkfs.cli.umount import flush_backends
from tests.conftest import needs_fuse
from tests.helpers import BLKFS, Mount, blkfs, mounted, pattern_image, wait_until

pytestmark = [needs_fuse, pytest.mark.fuse]
MiB = 1 << 20


def test_mount_creates_the_mountpoint_and_umount_waits_for_the_daemon(
    tmp_path: Path, images: Path
) -> None:
    image = images / "a.img"
    data = pattern_image(image, MiB, image_id=1)
    target = tmp_path / "new" / "mnt"
    mount = Mount.start(target, "--backend", f"a={image}")
    try:
        assert (target / "a").read_bytes() == data
        with open(target / "a", "r+b", buffering=0) as f:
            f.write(b"written before umount")
        result = blkfs("umount", str(target))
        assert result.returncode == 0
        assert not mounted(target) and not mount.alive()
        assert image.read_bytes().startswith(b"written before umount")
    finally:
        mount.stop()


def test_mount_errors_are_clear_and_leave_nothing(
    tmp_path: Path, images: Path, mount_factory
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = blkfs("mount", str(not_a_dir), check=False)
    assert result.returncode == 1 and "not a directory" in result.stderr

    busy = mount_factory()
    result = blkfs("mount", str(busy.path), check=False)
    assert result.returncode == 1 and "busy" in result.stderr

    target = tmp_path / "bad"
    result = blkfs("mount", str(target), "--backend", "x=/nonexistent.img", check=False)
    assert result.returncode == 1 and "/nonexistent.img" in result.stderr
    assert not mounted(target)

    result = blkfs("mount", str(target), "--backend", "noequals", check=False)
    assert result.returncode == 1 and "NAME=OPTIONS" in result.stderr


def test_umount_of_a_busy_mount_refuses_and_keeps_everything(mount_factory, images: Path) -> None:
    image = images / "a.img"
    data = pattern_image(image, MiB, image_id=1)
    mount = mount_factory("--backend", f"a={image}")
    with open(mount / "a", "rb") as f:
        result = blkfs("umount", str(mount.path), check=False)
        assert result.returncode == 1 and "busy" in result.stderr and "a (1 open)" in result.stderr
        assert mounted(mount.path) and mount.alive()
        assert f.read() == data


def test_umount_that_cannot_flush_refuses_and_keeps_the_data(mount_factory, images: Path) -> None:
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    pattern_image(images / "b.img", MiB, image_id=2)
    mount = mount_factory(
        "--backend",
        f"a=driver=blkdebug,node-name=dbg,"
        "inject-error.0.event=flush,inject-error.0.errno=EIO,"
        f"image.driver=file,image.filename={image}",
        "--backend",
        f"b={images / 'b.img'}",
    )
    fd = os.open(mount / "a", os.O_WRONLY)
    os.write(fd, b"not yet on disk")
    with pytest.raises(OSError) as closing:  # close flushes a written file: the writer is told
        os.close(fd)
    assert closing.value.errno == errno.EIO
    result = blkfs("umount", str(mount.path), check=False)
    assert result.returncode == 1
    assert "cannot flush a (Input/output error)" in result.stderr and "b (" not in result.stderr
    assert mounted(mount.path) and mount.alive()
    assert (mount / "a").read_bytes().startswith(b"not yet on disk")

    mount.ctl("reopen", "dbg inject-error=none")
    assert blkfs("umount", str(mount.path)).returncode == 0
    assert not mounted(mount.path) and not mount.alive()
    assert image.read_bytes().startswith(b"not yet on disk")


def test_umount_does_not_count_backends_gone_since_its_status_read(
    mount_factory, images: Path
) -> None:
    pattern_image(images / "a.img", MiB, image_id=1)
    mount = mount_factory("--backend", f"a={images / 'a.img'}", "--backend", "empty=")
    stale = [{"name": name, "medium": True, "read-only": False} for name in ("a", "empty", "gone")]
    assert flush_backends(str(mount.path), stale) == []


def test_umount_recovers_a_mount_whose_daemon_died(mount_factory, images: Path) -> None:
    mount = mount_factory()
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(lambda: not mount.alive(), "the daemon to die")
    result = blkfs("umount", str(mount.path), check=False)
    assert result.returncode == 0 and "had died" in result.stderr
    assert not mounted(mount.path)


def test_sigterm_flushes_and_unmounts(mount_factory, images: Path) -> None:
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    mount = mount_factory("--backend", f"a={image}")
    with open(mount / "a", "r+b", buffering=0) as f:
        f.write(b"sigterm")
    os.kill(mount.pid, signal.SIGTERM)
    wait_until(
        lambda: not mount.alive() and not mounted(mount.path),
        "the daemon to flush, unmount and exit",
        seconds=30,
    )
    assert image.read_bytes().startswith(b"sigterm")


def test_config_file_reproduces_a_mount(mount_factory, images: Path, tmp_path: Path) -> None:
    a, b = images / "a.img", images / "b.img"
    pattern_image(a, MiB, image_id=1)
    pattern_image(b, 2 * MiB, image_id=2)
    config = tmp_path / "blkfs.toml"
    config.write_text(f"""
image-dirs = ["{images}"]

[backends.disk0]
options = "{a}"

[backends.cd0]
read-only = true
options = {{ driver = "raw", file = {{ driver = "file", filename = "{b}" }} }}

[backends.empty]
""")
    mount = mount_factory("--config", str(config))
    backends = mount.backends()
    assert sorted(backends) == ["cd0", "disk0", "empty"]
    assert backends["cd0"]["read-only"] and not backends["empty"]["medium"]
    assert (mount / "cd0").read_bytes() == b.read_bytes()
    assert mount.status()["image-dirs"] == [str(images.resolve())]


def test_poll_max_ns_is_checked_and_nothing_is_mounted_on_a_bad_value(tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    for value in ("-1", "fast", "1000000001"):
        result = blkfs("mount", str(target), "--poll-max-ns", value, check=False)
        assert result.returncode == 1 and "--poll-max-ns: expected nanoseconds" in result.stderr
        assert not mounted(target)
    config = tmp_path / "blkfs.toml"
    for value in ("true", "1.5", '"64us"'):
        config.write_text(f"poll-max-ns = {value}\n")
        result = blkfs("mount", str(target), "--config", str(config), check=False)
        assert result.returncode == 1 and "config: poll-max-ns: expected" in result.stderr
        assert not mounted(target)


def asleep(pid: int) -> bool:
    """Every thread of the process waits in the kernel (none runs or busy-polls)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "stat") as f:
            states.append(f.read().rpartition(")")[2].split()[0])
    return all(state in ("S", "D") for state in states)


def daemon_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.parametrize("poll", ["--poll-max-ns=1000000", "--poll-max-ns=0"])
def test_reads_one_at_a_time_are_right_and_an_idle_daemon_rests(
    mount_factory, images: Path, poll: str
) -> None:
    """dd's 4 KiB reads, each sent after the last reply, come while the daemon busy-polls
    (with up to 1 ms, nearly all of them); once they stop, the daemon sleeps."""
    image = images / "a.img"
    data = pattern_image(image, 8 * MiB, image_id=3)
    mount = mount_factory("--backend", f"a={image}", poll)
    read = subprocess.run(
        ["dd", f"if={mount / 'a'}", "bs=4k", "iflag=direct", "status=none"],
        check=True,
        capture_output=True,
    ).stdout
    assert read == data
    wait_until(lambda: asleep(mount.pid), "the daemon to stop polling")
    before = daemon_cpu_ticks(mount.pid)
    time.sleep(1)  # not a wait: the span over which the resting daemon is measured
    assert daemon_cpu_ticks(mount.pid) - before <= 5  # clock ticks: at most 50 ms of CPU


def test_ctl_command_prints_the_error(mount_factory, images: Path) -> None:
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    mount = mount_factory()
    assert blkfs("ctl", str(mount.path), "create", "a", str(image)).returncode == 0
    result = blkfs("ctl", str(mount.path), "create", "a", str(image), check=False)
    assert result.returncode == 1 and "already exists" in result.stderr
    status = blkfs("ctl", str(mount.path), "status").stdout
    assert "a" in status and "raw" in status
    blkfs("ctl", str(mount.path), "throttle", "a", "bps-read=4M")
    assert mount.backends()["a"]["tree"]["info"]["limits"] == {"bps-read": 4 * MiB}
    result = blkfs("ctl", str(mount.path), "throttle", "a", "bps-read=fast", check=False)
    assert result.returncode == 1 and "bps-read" in result.stderr


def test_dd_and_cat_from_a_shell_script(mount_factory, images: Path) -> None:
    """The README's media-swap script, as a user runs it."""
    a, b = images / "a.iso", images / "b.iso"
    pattern_image(a, MiB, image_id=1)
    pattern_image(b, MiB, image_id=2)
    mount = mount_factory()
    script = f"""
set -e
M={mount.path}
echo "cd0" > $M/.ctl/create
for iso in {a} {b}; do
    echo "cd0 $iso,read-only=on" > $M/.ctl/change
    cmp $M/cd0 $iso
done
echo cd0 > $M/.ctl/eject
! echo "cd0 /no/such.iso" > $M/.ctl/insert
"""
    subprocess.run(["bash", "-c", script], check=True)
    assert "ENOENT" in mount.last_error()


def test_ctl_resolves_relative_names_in_the_callers_directory(mount_factory, images: Path) -> None:
    data = pattern_image(images / "rel.img", MiB, image_id=3)
    mount = mount_factory()
    blkfs("ctl", str(mount.path), "create", "r", "rel.img", cwd=images)
    blkfs(
        "ctl",
        str(mount.path),
        "create",
        "s",
        "driver=raw,file.driver=file,file.filename=rel.img,read-only=on",
        cwd=images,
    )
    assert (mount / "r").read_bytes() == data == (mount / "s").read_bytes()
    tree = mount.backends()["r"]["tree"]
    assert tree["children"]["file"]["options"]["filename"] == str(images / "rel.img")


def test_mounting_on_a_non_empty_directory_needs_nonempty(tmp_path: Path) -> None:
    target = tmp_path / "full"
    target.mkdir()
    (target / "precious.txt").write_text("do not hide me")
    result = blkfs("mount", str(target), check=False)
    assert result.returncode == 1 and "not empty" in result.stderr
    assert "precious.txt" in result.stderr and "--nonempty" in result.stderr
    assert not mounted(target)
    mount = Mount.start(target, "--nonempty")
    try:
        assert os.listdir(target) == [".ctl"]
    finally:
        mount.stop()
    assert (target / "precious.txt").read_text() == "do not hide me"


def test_a_daemon_without_a_log_file_logs_to_syslog(tmp_path: Path, images: Path) -> None:
    """One line per event, naming the backend; the test listens where syslog would."""
    pattern_image(images / "a.img", MiB, image_id=1)
    socket_path = tmp_path / "syslog.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(socket_path))
        listener.settimeout(10)
        target = tmp_path / "mnt"
        env = {**os.environ, "BLKFS_SYSLOG_SOCKET": str(socket_path)}
        subprocess.run(
            [*BLKFS, "mount", str(target), "--backend", f"disk={images / 'a.img'}"],
            check=True,
            env=env,
            capture_output=True,
            timeout=60,
        )
        try:
            lines = []
            while not any("disk: created" in line for line in lines):
                lines.append(listener.recv(4096).decode())
        finally:
            blkfs("umount", str(target))
    assert all(line.startswith("<") and "blkfs[" in line for line in lines)
    assert all("\n" not in line.rstrip("\n\0") for line in lines)


def test_image_create_lists_only_formats(images: Path) -> None:
    for fmt in ("vmdk", "throttle", "file"):
        result = blkfs("image", "create", "-f", fmt, str(images / "x.img"), "1M", check=False)
        assert result.returncode == 1 and "formats: qcow2, raw" in result.stderr, fmt
        assert "throttle" not in result.stderr.split("formats:")[1]
    assert not (images / "x.img").exists()


def test_a_reader_that_goes_away_ends_the_output_quietly(images: Path) -> None:
    """``blkfs image info X | head -1``: output into a closed pipe ends without a
    traceback, as other tools do."""
    image = images / "x.img"
    image.write_bytes(bytes(1 << 20))
    read, write = os.pipe()
    os.close(read)  # the reader has gone before anything is written
    try:
        result = subprocess.run(
            [*BLKFS, "image", "info", str(image)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            # buffered, as stdout into a pipe is unless PYTHONUNBUFFERED says otherwise
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
    finally:
        os.close(write)
    assert result.returncode != 0 and result.stderr == ""


def test_a_path_given_relative_at_mount_is_named_absolute_in_errors(
    mount_factory, images: Path
) -> None:
    """The daemon keeps the path it was given; a later error about that image names it as
    the user can use it anywhere, not as first typed."""
    image = images / "a.img"
    pattern_image(image, MiB, image_id=1)
    mount = mount_factory("--backend", "a=a.img", cwd=images)
    assert mount.backends()["a"]["tree"]["children"]["file"]["options"]["filename"] == str(image)
    assert mount.ctl_errno("create", f"b {image}") == errno.EBUSY
    assert f"'{image}' is in use" in mount.last_error()
