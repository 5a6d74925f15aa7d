"""One backend's device stops answering; the rest of the daemon does not notice.

The stuck device is a host file served by nbdfuse from nbdkit's memory plugin behind its
``pause`` filter: once paused, a request to it waits until the test resumes it. While a read,
a write or an fdatasync of backend ``slow`` waits there, ``.ctl/status`` answers (and shows the
request in flight), backend ``local`` reads and writes through the mount and through the NBD
export, and QMP's query-block answers. Every probe runs on a thread with a bounded join: a
probe that hangs fails the test (no timing is asserted). Afterwards nothing is lost and the
stuck qcow2 image is clean by ``qemu-img check``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.helpers import (
    Mount,
    blkfs,
    eval_disk,
    mounted,
    pattern_image,
    run,
    wait_until,
)
from tests.qmp.peer import drive

pytestmark = [pytest.mark.fuse, pytest.mark.qemu]

SIZE = 16 << 20
HUNG = 30.0
"""A probe still unanswered after this long hangs: the test fails (never reached when the
daemon is responsive; no figure is asserted)."""


def bounded(probe: Callable[[], Any], what: str) -> Any:
    """``probe()`` on a thread; fails the test if it has not returned within HUNG seconds."""
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(probe())
        except BaseException as exc:  # handed to the test's thread
            error.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(HUNG)
    if thread.is_alive():
        pytest.fail(f"{what} did not answer while another backend's device hung")
    if error:
        raise error[0]
    return result[0]


class HeldDisk:
    """A host file whose requests wait while :attr:`hold` exists."""

    def __init__(self, path: Path, hold: Path) -> None:
        self.path = path
        self.hold = hold

    def pause(self) -> None:
        self.hold.touch()

    def resume(self) -> None:
        self.hold.unlink(missing_ok=True)

    @contextmanager
    def stuck(
        self, file: Path, code: str, flags: int = os.O_RDWR
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A process of its own (see :data:`STUCK_OPS`) running ``code`` on ``f``, ``file``
        opened with ``flags``, while the disk holds its requests; afterwards the disk answers
        again and the process is gone, even on failure."""
        self.pause()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os, sys\nSTUCK = {STUCK}\nf = os.open({str(file)!r}, {flags})\n{code}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            yield proc
        finally:
            self.resume()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(params=["threads", "io_uring"])
def aio(request: pytest.FixtureRequest) -> str:
    """How the ``file`` nodes hand host calls off: worker threads, or the kernel's io_uring
    (whose blocked requests wait on io-wq's kernel workers)."""
    param: str = request.param
    return param


@pytest.fixture
def held_disk(tmp_path: Path) -> Iterator[HeldDisk]:
    """A qcow2 image (all clusters preallocated, so writes stay inside the fixed-size disk)
    on a host file served by nbdfuse from nbdkit's eval plugin, whose reads, writes and
    flushes wait while a hold file exists (nbdkit's pause filter holds no flush, and nbdfuse
    needs a plugin that can flush to pass fsync on); resumed and unmounted after the test,
    even when it failed."""
    store, hold, mnt = tmp_path / "store", tmp_path / "hold", tmp_path / "nbd"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", store, str(SIZE))
    with open(store, "r+b") as f:
        f.truncate(2 * SIZE)
    wait = f"while [ -e {hold} ]; do sleep 0.01; done"
    with eval_disk(mnt, store, 2 * SIZE, before=wait, flush=wait) as path:
        disk = HeldDisk(path, hold)
        try:
            yield disk
        finally:
            disk.resume()


def file_node(tree: dict[str, Any]) -> dict[str, Any]:
    while tree["driver"] != "file":
        tree = tree["children"]["file"]
    return tree


def neighbours_answer(mount: Mount, sockdir: Path, local: bytes) -> None:
    """Status shows the stuck request; local reads and writes through the mount and NBD; QMP
    answers."""

    def stuck_in_flight() -> dict[str, Any]:
        status: dict[str, Any] = {}

        def seen() -> bool:
            nonlocal status
            status = mount.backends()
            return bool(file_node(status["slow"]["tree"])["in-flight"])

        wait_until(seen, "the stuck request to show in status.json", HUNG)
        return status

    status = bounded(stuck_in_flight, ".ctl/status.json")
    assert file_node(status["slow"]["tree"])["oldest-ms"] is not None
    text = bounded((mount / ".ctl" / "status").read_text, ".ctl/status")
    assert "in-flight=" in text

    def local_io() -> None:
        with open(mount / "local", "r+b", buffering=0) as f:
            assert os.pread(f.fileno(), 4096, 8 << 20) == local[8 << 20 : (8 << 20) + 4096]
            os.pwrite(f.fileno(), b"N" * 4096, 4 << 20)
            assert os.pread(f.fileno(), 4096, 4 << 20) == b"N" * 4096

    bounded(local_io, "I/O of another backend")

    async def query(client: QMPClient) -> Any:
        return await client.execute("query-block")

    blocks = bounded(lambda: drive(sockdir / "m", query), "QMP query-block")
    assert {b["device"] for b in blocks} == {"local", "slow"}

    got = bounded(
        lambda: run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "read -P 0x4e 4M 4k",
            f"nbd+unix:///local?socket={sockdir / 'nbd'}",
        ),
        "an NBD client of another backend",
    )
    assert "read 4096/4096 bytes" in got


STUCK = 12 << 20
"""Where the stuck request goes: a cluster nothing has read before (no cache holds it)."""

STUCK_OPS = {
    "read": "sys.stdout.buffer.write(os.pread(f, 4096, STUCK))",
    "write": "os.pwrite(f, b'W' * 4096, STUCK)",
    "fdatasync": "os.fdatasync(f)",
}
"""What the stuck process does to backend ``slow``. A process of its own, not a thread of
the test's: a descriptor of a FUSE file with an fsync pending would hang the fork of every
process the test starts (the child's close waits for the fsync's inode lock)."""


@pytest.mark.parametrize("op", list(STUCK_OPS))
def test_a_hung_device_stalls_only_its_own_backend(
    op: str,
    aio: str,
    held_disk: HeldDisk,
    mount_factory: Callable[..., Mount],
    tmp_path: Path,
) -> None:
    local_image = tmp_path / "local.raw"
    local = pattern_image(local_image, SIZE, 1)
    with tempfile.TemporaryDirectory(prefix="hung") as short:
        sockdir = Path(short)
        mount = mount_factory(
            "--backend",
            f"local=driver=raw,file.driver=file,file.filename={local_image},file.aio={aio}",
            "--backend",
            f"slow=driver=qcow2,file.driver=file,file.filename={held_disk.path},file.aio={aio}",
            "--qmp",
            f"unix:{sockdir / 'm'}",
            "--nbd",
            f"unix:{sockdir / 'nbd'}",
            "--export",
            "local writable=on",
        )
        expected = {"read": bytes(4096), "write": b"W" * 4096, "fdatasync": b"F" * 4096}[op]
        if op == "fdatasync":
            with open(mount / "slow", "r+b", buffering=0) as f:
                os.pwrite(f.fileno(), expected, STUCK)  # for the flush to write out
        with held_disk.stuck(mount / "slow", STUCK_OPS[op]) as stuck:
            neighbours_answer(mount, sockdir, local)
            held_disk.resume()
            out, err = stuck.communicate(timeout=HUNG)
            assert stuck.returncode == 0, err.decode()
        if op == "read":
            assert out == expected
        with open(mount / "slow", "rb") as f:
            assert os.pread(f.fileno(), 4096, STUCK) == expected
        with open(mount / "local", "rb") as f:
            data = f.read()
        assert data[4 << 20 : (4 << 20) + 4096] == b"N" * 4096
        assert data[: 4 << 20] == local[: 4 << 20]
        assert data[(4 << 20) + 4096 :] == local[(4 << 20) + 4096 :]
        mount.ctl("delete", "slow")
    report = json.loads(run("qemu-img", "check", "--output=json", "-f", "qcow2", held_disk.path))
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report


LET_GO_OPS = {
    op: f"try:\n    {call}\nexcept OSError as exc:\n    sys.exit(exc.strerror)"
    for op, call in STUCK_OPS.items()
}
"""The stuck operations, exiting with the error's text when the request fails."""


@pytest.mark.parametrize(
    ("op", "verb"), [(op, "eject") for op in STUCK_OPS] + [("read", "change"), ("write", "delete")]
)
def test_a_hung_backend_is_let_go_with_force(
    op: str,
    verb: str,
    aio: str,
    held_disk: HeldDisk,
    mount_factory: Callable[..., Mount],
    tmp_path: Path,
) -> None:
    """eject, change or delete with force=on of a backend whose device does not answer
    returns; the stuck request fails with EIO; the image stays held (nothing reopens it for
    writing) until the device answers; the other backend never notices."""
    local_image, other = tmp_path / "local.raw", tmp_path / "other.raw"
    local = pattern_image(local_image, SIZE, 1)
    pattern_image(other, SIZE, 2)
    slow = f"driver=qcow2,file.driver=file,file.filename={held_disk.path},file.aio={aio}"
    mount = mount_factory(
        "--backend",
        f"local=driver=raw,file.driver=file,file.filename={local_image},file.aio={aio}",
        "--backend",
        f"slow={slow}",
    )
    if op == "fdatasync":
        with open(mount / "slow", "r+b", buffering=0) as f:
            os.pwrite(f.fileno(), b"F" * 4096, STUCK)
    with held_disk.stuck(mount / "slow", LET_GO_OPS[op]) as stuck:
        wait_until(
            lambda: bool(file_node(mount.backends()["slow"]["tree"])["in-flight"]),
            "the stuck request to show in status.json",
            HUNG,
        )
        command = {
            "eject": ("eject", "slow force=on"),
            "change": (
                "change",
                f"slow driver=raw,file.driver=file,file.filename={other},file.aio={aio},force=on",
            ),
            "delete": ("delete", "slow force=on"),
        }[verb]
        bounded(lambda: mount.ctl(*command), f"{verb} force=on of the hung backend")
        _, err = stuck.communicate(timeout=HUNG)
        assert stuck.returncode == 1 and "Input/output error" in err.decode(), err.decode()
        # the stuck host call still owns the image: nothing may open it for writing
        assert mount.ctl_errno("create", f"again {slow}") == errno.EBUSY
        assert "again" not in mount.backends()
        with open(mount / "local", "rb") as f:
            assert f.read() == local
        if verb == "change":
            with open(mount / "slow", "rb") as f:
                assert f.read(4096) == other.read_bytes()[:4096]
    # once the device answers, the old tree closes and the image can be used again
    wait_until(lambda: mount.ctl_errno("create", f"again {slow}") == 0, "the image to be free")
    mount.ctl("delete", "again")
    report = json.loads(run("qemu-img", "check", "--output=json", "-f", "qcow2", held_disk.path))
    assert report.get("corruptions", 0) == 0, report


def test_umount_names_a_hung_backend_and_force_lets_it_go(
    aio: str, held_disk: HeldDisk, mount_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    local_image = tmp_path / "local.raw"
    pattern_image(local_image, SIZE, 1)
    mount = mount_factory(
        "--backend",
        f"local=driver=raw,file.driver=file,file.filename={local_image},file.aio={aio}",
        "--backend",
        f"slow=driver=qcow2,file.driver=file,file.filename={held_disk.path},file.aio={aio}",
    )
    with held_disk.stuck(mount / "slow", LET_GO_OPS["read"], os.O_RDONLY) as stuck:
        wait_until(
            lambda: (file_node(mount.backends()["slow"]["tree"])["oldest-ms"] or 0) >= 5000,
            "the stuck read to have waited five seconds",
            HUNG,
        )
        refused = bounded(
            lambda: blkfs("umount", str(mount.path), check=False), "umount of a hung mount"
        )
        assert refused.returncode != 0
        assert "slow" in refused.stderr and "does not answer" in refused.stderr, refused.stderr
        assert mounted(mount.path) and "local" in mount.backends()
        done = bounded(
            lambda: blkfs("umount", "--force", str(mount.path), check=False),
            "umount --force of a hung mount",
        )
        assert done.returncode == 0, done.stderr
        assert not mounted(mount.path)
        _, err = stuck.communicate(timeout=HUNG)
        assert stuck.returncode == 1 and "Input/output error" in err.decode(), err.decode()
