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


class Dockerd:
    """dockerd, and a containerd of its own as a host runs it (a service apart: a dockerd
    killed leaves its containers running), each with its state and socket in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "docker.sock"
        self.containerd_socket = directory / "containerd.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.log = directory / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None
        self.served = False
        """dockerd answered once (a dockerd that never started is not restarted to stop)."""

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The docker command against this dockerd; with ``check``, a failure says why."""
        done = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        assert not check or done.returncode == 0, f"docker {' '.join(args)}: {done.stderr}"
        return done

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self) -> None:
        """Start dockerd (and containerd, the first time) and wait until it answers; skip,
        saying why, if it cannot start."""
        if self.containerd is None:
            self.containerd = self._spawn(
                "containerd",
                "--root",
                str(self.directory / "containerd"),
                "--state",
                str(self.directory / "containerd-state"),
                "--address",
                str(self.containerd_socket),
            )
            wait_until(self.containerd_socket.exists, "containerd", 60)
        self.process = process = self._spawn(
            "dockerd",
            "--iptables=false",
            "--bridge=none",
            "--containerd",
            str(self.containerd_socket),
            "--data-root",
            str(self.directory / "root"),
            "--exec-root",
            str(self.directory / "exec"),
            "--pidfile",
            str(self.directory / "dockerd.pid"),
            "--host",
            f"unix://{self.socket}",
        )
        wait_until(
            lambda: (
                process.poll() is not None or self.docker("version", check=False).returncode == 0
            ),
            "dockerd",
            60,
        )
        if process.poll() is not None:
            pytest.skip(f"dockerd cannot start here: {self.log.read_text().splitlines()[-1:]}")
        self.served = True

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop dockerd (SIGTERM stops its containers too; SIGKILL leaves them running)."""
        assert self.process is not None
        _end(self.process, signum)

    def shut_down(self) -> None:
        """Containers, dockerd, containerd, and the mounts they leave, all gone (containerd
        too when dockerd never served)."""
        try:
            if self.process is not None and self.served:
                if self.process.poll() is not None:  # killed by the test: containers run on
                    self.start()
                containers = self.docker("ps", "-aq", check=False).stdout.split()
                self.docker("rm", "--force", *containers, check=False)
                self.stop()
        finally:
            if self.containerd is not None:
                _end(self.containerd, signal.SIGTERM)
            with open("/proc/mounts") as f:
                left = [line.split()[1] for line in f if str(self.directory) in line.split()[1]]
            for where in reversed(left):
                subprocess.run(["umount", "-l", where], check=False)


def _end(process: subprocess.Popen[bytes], signum: int) -> None:
    process.send_signal(signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def running_dockerd(directory: Path) -> Iterator[Dockerd]:
    """dockerd for the body, stopped afterwards (its containers with it), even on failure.
    Skips, saying why, only where dockerd is not installed or cannot start (CI turns the
    skip into a failure: these tests are marked as needing FUSE and loop devices)."""
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        pytest.skip("dockerd is not installed (scripts/setup installs docker.io)")
    directory.mkdir()
    daemon = Dockerd(directory)
    try:
        daemon.start()
        busybox_tarball(directory / "busybox.tar")
        daemon.docker("import", str(directory / "busybox.tar"), IMAGE)
        yield daemon
    finally:
        daemon.shut_down()
