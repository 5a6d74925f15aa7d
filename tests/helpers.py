"""Test helpers for real mounts: start a blkfs daemon, talk to .ctl, always clean up."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BLKFS = [sys.executable, "-m", "blkfs"]


def blkfs(*args: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the blkfs command as a user would; returns the completed process."""
    return subprocess.run(
        [*BLKFS, *args], check=check, capture_output=True, text=True, timeout=120, **kwargs
    )


def mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def blkfs_mounts_under(base: Path) -> list[Path]:
    """The blkfs mounts at or below ``base``."""
    with open("/proc/mounts") as f:
        points = [Path(fields[1]) for fields in map(str.split, f) if fields[2] == "fuse.blkfs"]
    return [point for point in points if point.is_relative_to(base)]


class Mount:
    """A running ``blkfs mount`` daemon on ``path``."""

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        self.pid = self.status()["pid"]

    @classmethod
    def start(cls, path: Path, *args: str, cwd: Path | None = None) -> Mount:
        """``blkfs mount`` run in ``cwd`` (relative paths in ``args`` are relative to it)."""
        log = path.with_name(path.name + ".log")
        result = blkfs(
            "mount",
            str(path),
            "--log-file",
            str(log),
            "--log-level",
            "debug",
            *args,
            check=False,
            cwd=cwd,
        )
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
    """True while any thread of the process runs. A zombie waiting for its reaper has finished;
    but a killed thread-group leader shows as a zombie while its other threads still exit, and
    the last of them is the one that closes the process's files (a FUSE connection ends there)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            continue  # that thread is gone
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


def node(tree: dict[str, Any], name: str) -> dict[str, Any]:
    """The node called ``name`` in a status.json tree."""
    if tree["node-name"] == name:
        return tree
    for child in tree["children"].values():
        try:
            return node(child, name)
        except KeyError:
            pass
    raise KeyError(name)


VOLATILE = frozenset({"stats", "in-flight", "oldest-ms"})
"""Status keys that count requests (a running job's, a flush's) rather than state."""


def without_stats(value: Any) -> Any:
    """Status without its request counters, for "a failed command changed nothing": a
    change flushes the outgoing medium before it opens anything, so a change that fails has
    still counted a flush, and a running job keeps making requests."""
    if isinstance(value, dict):
        return {k: without_stats(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [without_stats(v) for v in value]
    return value


def pattern_image(path: Path, size: int, image_id: int, block: int = 4096) -> bytes:
    """A raw image whose every block starts with its image id and block number."""
    data = bytearray(size)
    for index in range(size // block):
        stamp = f"img{image_id:04d}:blk{index:08d}:".encode()
        data[index * block : index * block + len(stamp)] = stamp
    path.write_bytes(data)
    return bytes(data)


def run(*args: str | Path) -> str:
    """Run a system tool; its stdout, or CalledProcessError with what it printed."""
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, timeout=300
    ).stdout.strip()


@contextmanager
def loop_device(path: Path, sector_size: int = 512) -> Iterator[str]:
    """A loop device over ``path`` (with that logical block size) for the body; detached
    afterwards, even on failure."""
    device = run("losetup", "--find", "--show", "--sector-size", str(sector_size), path)
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextmanager
def mounted_fs(device: str, where: Path) -> Iterator[Path]:
    """The filesystem on ``device`` mounted on ``where`` for the body; unmounted afterwards,
    even on failure."""
    where.mkdir(exist_ok=True)
    run("mount", device, where)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small host filesystem (tmpfs of ``size``, as mount's size= spells it) on ``where``
    for the body, unmounted afterwards, even on failure. ``mount -o remount,size=...``
    makes room in it as an administrator would."""
    where.mkdir(exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where)
    try:
        yield where
    finally:
        if mounted(where):
            subprocess.run(["umount", str(where)], check=False)
        if mounted(where):
            subprocess.run(["umount", "-l", str(where)], check=False)
        assert not mounted(where)


@contextmanager
def eval_disk(
    mnt: Path, store: Path, size: int, *, before: str = "", flush: str = "exit 0"
) -> Iterator[Path]:
    """A host file ``mnt/disk`` of ``size`` bytes kept in ``store``: nbdfuse serving nbdkit's
    eval plugin, which runs shell command ``before`` ahead of each read and write, and
    ``flush`` as each flush (a plugin that can flush, for nbdfuse to pass fsync on). The FUSE
    mount and nbdkit are gone afterwards, even on failure."""
    first = f"{before}; " if before else ""
    mnt.mkdir()
    log = mnt.with_name(f"{mnt.name}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                "nbdfuse",
                f"{mnt}/disk",
                "--command",
                "nbdkit",
                "-s",
                "eval",
                f"get_size=echo {size}",
                f"pread={first}dd if={store} skip=$4 count=$3 iflag=count_bytes,skip_bytes "
                "status=none",
                f"pwrite={first}dd of={store} seek=$4 conv=notrunc oflag=seek_bytes status=none",
                "can_flush=exit 0",
                f"flush={flush}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: mounted(mnt) or proc.poll() is not None, "nbdfuse to mount")
        assert mounted(mnt), log.read_text()
        yield mnt / "disk"
    finally:
        force_unmount(mnt)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def flaky_disk(directory: Path, size: int = 64 << 20) -> Iterator[tuple[Path, Path]]:
    """A host file whose fdatasync fails while a trigger file exists: an :func:`eval_disk`
    whose flush fails with EIO then (nbdkit 1.32's error filter cannot fail flushes). Yields
    (disk, trigger); the FUSE mount and nbdkit are gone afterwards, even on failure."""
    mnt, trigger, store = directory / "flaky", directory / "flaky-trigger", directory / "store"
    with open(store, "wb") as f:
        f.truncate(size)
    fail = f"if [ -e {trigger} ]; then echo EIO injected >&2; exit 1; fi"
    with eval_disk(mnt, store, size, flush=fail) as disk:
        yield disk, trigger


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``condition`` (the kernel lets go of loop devices asynchronously)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


__all__ = [
    "Mount",
    "MountError",
    "blkfs",
    "errno",
    "errno_of",
    "eval_disk",
    "flaky_disk",
    "force_unmount",
    "loop_device",
    "mounted",
    "mounted_fs",
    "node",
    "pattern_image",
    "run",
    "tmpfs",
    "wait_until",
    "without_stats",
]


@contextmanager
def mounts_in(base: Path) -> Iterator[Callable[..., Mount]]:
    """Start blkfs mounts under ``base`` with given arguments; all are stopped on exit, even
    when the body failed, and no daemon outlives it."""
    started: list[Mount] = []

    def start(*args: str, cwd: Path | None = None) -> Mount:
        mount = Mount.start(base / f"mnt{len(started)}", *args, cwd=cwd)
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
