"""``blkfs umount MOUNTPOINT``: refuses while backend files are open (naming who holds them:
loop devices, NBD clients), flushes every writable backend while a failure can still stop it,
then asks the daemon to drain and unmount, and waits for it to exit. A mount whose daemon
died is lazily unmounted with a message; with ``--force``, a backend whose device does not
answer is let go first."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from blkfs.cli.errors import UsageError
from blkfs.info import BackendStatus, DaemonStatus, ExportStatus, NodeTree

UMOUNT_TIMEOUT = 120.0
STUCK_MS = 5000
"""A host call running this long means a device that does not answer, to umount."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    umount = sub.add_parser("umount", help="drain, flush and unmount")
    umount.add_argument("mountpoint")
    umount.add_argument(
        "--force",
        action="store_true",
        help="eject backends whose device does not answer (their requests fail with EIO), "
        "then unmount",
    )
    umount.set_defaults(func=cmd_umount)


def read_status(mountpoint: str) -> DaemonStatus:
    with open(os.path.join(mountpoint, ".ctl", "status.json")) as f:
        status: DaemonStatus = json.load(f)
    return status


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        status = read_status(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            lazy_unmount(mountpoint)
            print(
                f"blkfs: the daemon of {mountpoint} had died (Transport endpoint is not "
                "connected); lazily unmounted the dead mount, the mountpoint is free again",
                file=sys.stderr,
            )
            return 0
        if exc.errno == errno.ENOENT:
            raise UsageError(f"{mountpoint} is not a blkfs mount") from None
        raise UsageError(f"cannot reach {mountpoint}: {exc.strerror}") from None
    hung = {b["name"]: why for b in status["backends"] if (why := stuck_calls(b["tree"]))}
    if hung and not args.force:
        raise UsageError(
            f"{mountpoint}: the device of {', '.join(f'{n} ({w})' for n, w in hung.items())} "
            "does not answer; nothing was changed. 'blkfs umount --force' lets it go (its "
            "requests fail with EIO) and unmounts"
        )
    for name in hung:
        let_go(mountpoint, name)
    busy = [
        describe_users(mountpoint, b, status.get("exports", []))
        for b in status["backends"]
        if b["open"] and b["name"] not in hung
    ]
    if busy:
        raise UsageError(
            f"{mountpoint} is busy: {'; '.join(busy)}; close those files first "
            "(nothing was changed)"
        )
    unflushed = flush_backends(mountpoint, status["backends"])
    if unflushed:
        raise UsageError(
            f"cannot flush {', '.join(unflushed)}; {mountpoint} stays mounted "
            "so that nothing is lost: fix the cause (a full or failing host disk?) "
            "and run blkfs umount again"
        )
    pid = status["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    # a daemon whose calls were let go exits once they return; the mount goes at once
    while (_alive(pid) and not hung) or os.path.ismount(mountpoint):
        if time.monotonic() > deadline:
            raise UsageError(f"the daemon (pid {pid}) did not exit within {UMOUNT_TIMEOUT:.0f}s")
        time.sleep(0.05)
    return 0


def stuck_calls(tree: NodeTree | None) -> str:
    """The nodes of a backend's tree whose oldest host call has run :data:`STUCK_MS` or
    more, described; empty if none."""
    if tree is None:
        return ""
    found = (
        [f"node {tree['node-name']}: {tree['in-flight']} in flight, oldest {tree['oldest-ms']} ms"]
        if (tree["oldest-ms"] or 0) >= STUCK_MS
        else []
    )
    found += [why for child in tree.get("children", {}).values() if (why := stuck_calls(child))]
    return "; ".join(found)


def let_go(mountpoint: str, name: str) -> None:
    """Eject a backend whose device does not answer, with force=on (docs/design.md, "What
    runs where")."""
    try:
        with open(os.path.join(mountpoint, ".ctl", "eject"), "wb", buffering=0) as f:
            f.write(f"{name} force=on".encode())
    except OSError as exc:
        raise UsageError(f"cannot let {name} go: {exc.strerror}") from None
    print(f"blkfs: {name}: its device did not answer; ejected with force=on", file=sys.stderr)


def describe_users(mountpoint: str, backend: BackendStatus, exports: list[ExportStatus]) -> str:
    """Who has a backend open, naming the loop devices, which lsof does not show, and the
    NBD clients."""
    text = f"{backend['name']} ({'deleted, ' if backend['deleted'] else ''}{backend['open']} open"
    loops = loop_devices(os.path.join(mountpoint, backend["name"]))
    if loops:
        text += f"; loop device {', '.join(loops)}: losetup -d {' '.join(loops)}"
    for export in exports:
        if export["backend"] == backend["name"] and export["clients"]:
            peers = ", ".join(client["peer"] for client in export["clients"])
            text += f"; NBD clients of export '{export['name']}': {peers}" + (
                "" if export["retired"] else f": export-del {export['name']} force=on"
            )
    return text + ")"


def loop_devices(path: str) -> list[str]:
    """The loop devices whose backing file is ``path`` (/sys/block/loop*/loop/backing_file;
    the kernel adds " (deleted)" once the file was removed)."""
    found = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            name = backing.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if name == path:
            found.append(f"/dev/{backing.parent.parent.name}")
    return found


def flush_backends(mountpoint: str, backends: list[BackendStatus]) -> list[str]:
    """fsync every writable backend through the mount; name those that fail.

    The daemon flushes again as it exits, but by then a failure can only be logged: flushing
    first lets umount refuse while the data can still be saved."""
    failed = []
    for backend in backends:
        if not backend["medium"] or backend["read-only"]:
            continue
        try:
            fd = os.open(os.path.join(mountpoint, backend["name"]), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOMEDIUM):  # deleted or ejected since
                failed.append(f"{backend['name']} ({exc.strerror})")
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours (foreground tests) has finished too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def lazy_unmount(mountpoint: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", "-z", mountpoint] if tool else ["umount", "-l", mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise UsageError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")
