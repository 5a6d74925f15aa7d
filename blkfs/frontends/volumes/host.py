"""The host side of a volume: the blkfs mount's ``.ctl`` files and ``blkfs`` command, and
the system's losetup, blkid, mkfs, mount and fsfreeze. Every call here may block (a flush, a
job, mkfs); the server runs each request in a thread of its own."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from blkfs.errors import BlockError

log = logging.getLogger("blkfs.volumes")

BLKFS = [sys.executable, "-m", "blkfs"]
MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q"]}
"""The filesystems a volume may get, and how each is made."""


def run(*args: str, what: str) -> str:
    """A host command's output; BlockError with its message when it fails."""
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise BlockError(errno.ENOENT, f"{what}: {args[0]} is not installed") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"{args[0]} exited with {done.returncode}"
        raise BlockError(errno.EIO, f"{what}: {detail.removeprefix('blkfs: ')}")
    return done.stdout


class BlkfsMount:
    """A blkfs mount, reached as its users reach it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def alive(self) -> bool:
        return self.path.joinpath(".ctl", "status.json").exists()

    def start(self, image_dirs: list[Path], log_file: Path) -> None:
        """Mount blkfs here, images allowed only in ``image_dirs``; returns when it serves."""
        self.path.mkdir(parents=True, exist_ok=True)
        args = ["mount", str(self.path), "--log-file", str(log_file)]
        for directory in image_dirs:
            args += ["--image-dir", str(directory)]
        self.blkfs(*args, what="blkfs mount")

    def blkfs(self, *args: str, what: str) -> str:
        return run(*BLKFS, *args, what=what)

    def send(self, verb: str, text: str) -> None:
        """One ``.ctl`` command; BlockError with the daemon's reason if it failed."""
        folder = self.path / ".ctl"
        try:
            with open(folder / verb, "wb", buffering=0) as f:
                f.write(text.encode())
        except OSError as exc:
            lines = (folder / "error").read_text().splitlines() if folder.is_dir() else []
            code = exc.errno or errno.EIO
            raise BlockError(code, lines[-1] if lines else f"{verb}: {exc.strerror}") from None

    def backend(self, key: str) -> dict[str, Any] | None:
        """A backend's entry in ``.ctl/status.json``, if there is one by that name."""
        status = json.loads(self.path.joinpath(".ctl", "status.json").read_text())
        for backend in status["backends"]:
            if backend["name"] == key and not backend["deleted"]:
                return dict(backend)
        return None

    def file(self, key: str) -> Path:
        return self.path / key


def chain(tree: dict[str, Any]) -> list[str]:
    """The image files of a backend's tree (status.json), active first, backing files last."""
    if tree["driver"] == "file":
        return [str(tree["options"]["filename"])]
    children = tree["children"]
    roles = sorted(children, key=lambda role: role == "backing")
    return [name for role in roles for name in chain(children[role])]


# -- the filesystem on a loop device ---------------------------------------------------------


def loop_of(backing: Path) -> str | None:
    """The loop device attached to ``backing``, if one is."""
    found = run(
        "losetup", "--noheadings", "--output", "NAME", "--associated", str(backing), what="losetup"
    )
    devices = found.split()
    return devices[0] if devices else None


def attach(backing: Path) -> str:
    return run("losetup", "--find", "--show", str(backing), what="losetup").strip()


def detach(device: str) -> None:
    """Let the loop device go (the kernel does once its last user has)."""
    subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


def wait_detached(backing: Path, seconds: float) -> None:
    """Until ``backing`` has no loop device, for ``seconds`` at most."""
    deadline = time.monotonic() + seconds
    while loop_of(backing) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def make_filesystem(device: str, fs: str) -> None:
    """mkfs, unless the device holds a filesystem already (blkid finds one): a volume is
    formatted on its first mount only, whatever happened to the plugin in between."""
    probe = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", device],
        check=False,
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0 and probe.stdout.strip():
        return
    run(*MKFS[fs], device, what=f"mkfs.{fs}")


def mounted(where: Path) -> bool:
    return os.path.ismount(where)


def mount(device: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", device, str(where), what="mount")


def unmount(where: Path) -> None:
    run("umount", str(where), what="umount")


def freeze(where: Path) -> None:
    run("fsfreeze", "--freeze", str(where), what="fsfreeze")


def thaw(where: Path) -> None:
    run("fsfreeze", "--unfreeze", str(where), what="fsfreeze")


def host_bytes(files: list[str]) -> int:
    """Space the files take on the host (allocated blocks, not their apparent size)."""
    return sum(os.stat(f).st_blocks * 512 for f in files if os.path.exists(f))
