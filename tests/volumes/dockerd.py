"""A dockerd of the test's own (its data root, its socket, no networking) and a busybox
image built locally from Debian's busybox-static: no registry is reachable from a test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import wait_until

IMAGE = "blkfs-busybox:test"
APPLETS = ("sh", "cat", "echo", "dd", "sync", "sleep", "ls", "cmp", "mkdir", "rm")


class Dockerd:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
            timeout=300,
        )


def busybox_tarball(path: Path) -> None:
    """A root filesystem holding busybox-static and links to the applets the tests run."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox is missing (scripts/setup installs busybox-static)"
    with tarfile.open(path, "w") as tar:
        tar.add(busybox, "bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for folder in ("data", "tmp", "proc", "sys", "dev"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)


@contextmanager
def running_dockerd(directory: Path) -> Iterator[Dockerd]:
    """dockerd for the body, stopped afterwards (its containers with it), even on failure.
    Skips, saying why, only where dockerd is not installed or cannot start (CI turns the
    skip into a failure: these tests are marked as needing FUSE and loop devices)."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("dockerd is not installed (scripts/setup installs docker.io)")
    directory.mkdir()
    daemon = Dockerd(directory)
    log = directory / "dockerd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "--data-root",
                str(directory / "root"),
                "--exec-root",
                str(directory / "exec"),
                "--pidfile",
                str(directory / "dockerd.pid"),
                "--host",
                f"unix://{daemon.socket}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: (
                process.poll() is not None or daemon.docker("version", check=False).returncode == 0
            ),
            "dockerd",
            60,
        )
        if process.poll() is not None:
            pytest.skip(f"dockerd cannot start here: {log.read_text().strip().splitlines()[-1:]}")
        busybox_tarball(directory / "busybox.tar")
        daemon.docker("import", str(directory / "busybox.tar"), IMAGE)
        yield daemon
    finally:
        daemon.docker(
            "rm", "--force", *daemon.docker("ps", "-aq", check=False).stdout.split(), check=False
        )
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
