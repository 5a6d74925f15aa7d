"""Test helpers for real mounts: start a blkfs daemon, talk to .ctl, always clean up."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

BLKFS = [sys.executable, "-m", "blkfs"]


def blkfs(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the blkfs command as a user would; returns the completed process."""
    return subprocess.run([*BLKFS, *args], check=check, capture_output=True, text=True,
                          timeout=120, **kwargs)


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Mount:
    """A running ``blkfs mount`` daemon on ``path``."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        self.pid = self.status()["pid"]

    @classmethod
    def start(cls, path: Path, *args: str) -> Mount:
        log = path.with_name(path.name + ".log")
        result = blkfs("mount", str(path), "--log-file", str(log), "--log-level", "debug",
                       *args, check=False)
        if result.returncode:
            raise MountError(result.stderr.strip())
        return cls(path, log)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def ctl(self, verb: str, text: str | bytes) -> None:
        """One .ctl command; raises OSError with the command's errno if it failed."""
        data = text.encode() if isinstance(text, str) else text
        fd = os.open(self.path / ".ctl" / verb, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def ctl_errno(self, verb: str, text: str | bytes) -> int:
        """The errno a failing command gives (0 if it succeeded)."""
        try:
            self.ctl(verb, text)
        except OSError as exc:
            return exc.errno or -1
        return 0

    def status(self) -> dict[str, Any]:
        return json.loads((self.path / ".ctl" / "status.json").read_text())

    def backends(self) -> dict[str, dict[str, Any]]:
        return {b["name"]: b for b in self.status()["backends"]}

    def last_error(self) -> str:
        lines = (self.path / ".ctl" / "error").read_text().splitlines()
        return lines[-1] if lines else ""

    def stop(self) -> None:
        """Unmount cleanly if possible, else by force; never leaves the daemon running."""
        if mounted(self.path):
            result = blkfs("umount", str(self.path), check=False)
            if result.returncode:
                force_unmount(self.path)
        kill_daemon(self.pid)

    def alive(self) -> bool:
        return pid_alive(self.pid)


class MountError(Exception):
    """``blkfs mount`` failed; the message is what it printed."""


def pid_alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting for its reaper has finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_daemon(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def force_unmount(path: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def errno_of(func: Any, *args: Any) -> int:
    """Run func(*args); the errno of the OSError it raised, or 0."""
    try:
        func(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def pattern_image(path: Path, size: int, image_id: int, block: int = 4096) -> bytes:
    """A raw image whose every block starts with its image id and block number."""
    data = bytearray(size)
    for index in range(size // block):
        stamp = f"img{image_id:04d}:blk{index:08d}:".encode()
        data[index * block:index * block + len(stamp)] = stamp
    path.write_bytes(data)
    return bytes(data)


__all__ = ["Mount", "MountError", "blkfs", "errno", "errno_of", "force_unmount",
           "mounted", "pattern_image"]


@contextmanager
def mounts_in(base: Path) -> Iterator[Callable[..., Mount]]:
    """Start blkfs mounts under ``base`` with given arguments; all are stopped on exit, even
    when the body failed, and no daemon outlives it."""
    started: list[Mount] = []

    def start(*args: str) -> Mount:
        mount = Mount.start(base / f"mnt{len(started)}", *args)
        started.append(mount)
        return mount

    try:
        yield start
    finally:
        for mount in started:
            mount.stop()
        leftovers = [m.path for m in started if mounted(m.path) or m.alive()]
        for path in leftovers:
            force_unmount(path)
    assert not leftovers, f"mounts left behind: {leftovers}"
