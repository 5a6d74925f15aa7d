"""``blkfs``: mount, umount, ctl and image commands.

``mount`` returns only once the mount serves (or has failed, with the reason), daemonizing
unless ``--foreground``. ``umount`` refuses while backend files are open, then asks the daemon
to drain, flush and unmount, and waits for it to exit. A mount whose daemon died is lazily
unmounted with a message.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

import trio

from blkfs.backend import parse_bool, parse_options
from blkfs.cli import completion, image, jobs, mount_helper
from blkfs.commands import COMMANDS, Commands
from blkfs.daemon import Daemon, DaemonConfig, ExporterFactory, FrontendFactory
from blkfs.errors import BlockError
from blkfs.frontends import ctl
from blkfs.frontends.fuse import POLL_MAX_NS, FuseFrontend
from blkfs.frontends.nbd import NbdFrontend
from blkfs.frontends.nbd.export import PLAINTEXT, parse_address, socket_mode, tls_setting
from blkfs.frontends.qmp import QmpFrontend
from blkfs.frontends.qmp import parse_address as parse_qmp_address
from blkfs.frontends.volumes import command as volume_command
from blkfs.info import BackendStatus, DaemonStatus, ExportStatus, NodeTree
from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs")
UMOUNT_TIMEOUT = 120.0
STUCK_MS = 5000
"""A host call running this long means a device that does not answer, to umount."""
CONFIG_KEYS = (
    "mountpoint",
    "image-dirs",
    "allow-nbd",
    "allow-other",
    "backends",
    "nbd",
    "nbd-mode",
    "nbd-tls",
    "nbd-tls-creds",
    "nbd-tls-verify-peer",
    "nbd-tls-authz",
    "exports",
    "qmp",
    "poll-max-ns",
)
"""The keys of a ``--config`` TOML file."""
MAX_POLL_NS = 1_000_000_000
"""``--poll-max-ns`` at most a second: a daemon may busy-poll that long once when it idles."""


class UsageError(Exception):
    """The user asked for something that cannot be done; the message says why."""


def fail(message: str, status: int = 1) -> NoReturn:
    print(f"blkfs: {message}", file=sys.stderr)
    sys.exit(status)


# -- mount ---------------------------------------------------------------------------------


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path}: {exc}") from None


def build_config(args: argparse.Namespace) -> tuple[DaemonConfig, str]:
    """The daemon's configuration and the mountpoint, from the TOML config (if any) and the
    command line, whose flags add to it."""
    data = load_config(args.config) if args.config else {}
    unknown = set(data) - set(CONFIG_KEYS)
    if unknown:
        raise UsageError(
            f"config: unknown keys {', '.join(sorted(unknown))} (known: {', '.join(CONFIG_KEYS)})"
        )
    backends = []
    for name, table in data.get("backends", {}).items():
        if not isinstance(table, dict) or set(table) - {"options", "read-only"}:
            raise UsageError(f"config: [backends.{name}] takes 'options' and 'read-only'")
        options = table.get("options")
        backends.append(
            create_args(
                name,
                json.dumps(options) if isinstance(options, dict) else options,
                bool(table.get("read-only")),
            )
        )
    for item in args.backend:
        name, sep, options = item.partition("=")
        if not sep or not name:
            raise UsageError(
                f"--backend expects NAME=OPTIONS (or NAME= for an empty drive), got '{item}'"
            )
        backends.append(create_args(name, options))
    image_dirs = [*data.get("image-dirs", []), *args.image_dir] or None
    for directory in image_dirs or ():
        if not os.path.isdir(directory):
            raise UsageError(f"--image-dir {directory}: not a directory")
    nbd_servers = [*data.get("allow-nbd", []), *args.allow_nbd]
    try:
        BlockLayer(image_dirs, nbd_servers)  # checks --allow-nbd before the daemon starts
    except BlockError as exc:
        raise UsageError(str(exc)) from None
    mountpoint = args.mountpoint or data.get("mountpoint")
    if not isinstance(mountpoint, str):
        raise UsageError("no mountpoint: name one, or give it as 'mountpoint' in the --config file")
    mountpoint = os.path.abspath(mountpoint)
    allow_other = args.allow_other or bool(data.get("allow-other"))
    poll_max_ns = (
        poll_time(args.poll_max_ns, "--poll-max-ns")
        if args.poll_max_ns is not None
        else poll_time(data.get("poll-max-ns", POLL_MAX_NS), "config: poll-max-ns")
    )

    def fuse(layer: BlockLayer, commands: Commands) -> FuseFrontend:
        return FuseFrontend(layer, commands, mountpoint, allow_other, poll_max_ns)

    frontends: list[FrontendFactory] = [fuse]
    qmp = args.qmp or data.get("qmp")
    if qmp is not None:
        frontends.append(qmp_frontend(qmp, mountpoint))
    return DaemonConfig(
        backends=backends,
        image_dirs=image_dirs,
        nbd_servers=nbd_servers,
        frontends=frontends,
        exporter=nbd_frontend(data, args),
    ), mountpoint


def poll_time(value: Any, source: str) -> int:
    """``--poll-max-ns`` (``poll-max-ns`` in the config), checked."""
    try:
        ns = int(value) if isinstance(value, str) else value
    except ValueError:
        ns = None
    if type(ns) is not int or not 0 <= ns <= MAX_POLL_NS:  # not a bool, not a float cut
        raise UsageError(
            f"{source}: expected nanoseconds from 0 (never poll) to {MAX_POLL_NS}, got {value!r}"
        )
    return ns


def qmp_frontend(where: Any, mountpoint: str) -> FrontendFactory:
    """The QMP monitor (``--qmp``, ``qmp`` in the config): a unix socket, mode 0600."""
    if not isinstance(where, str):
        raise UsageError("config: qmp must be a string (unix:PATH)")
    try:
        path = os.path.abspath(parse_qmp_address(where))
    except BlockError as exc:
        raise UsageError(f"--qmp: {exc}") from None

    def qmp(layer: BlockLayer, commands: Commands) -> QmpFrontend:
        return QmpFrontend(layer, commands, path, mountpoint)

    return qmp


def nbd_frontend(data: dict[str, Any], args: argparse.Namespace) -> ExporterFactory:
    """The NBD frontend: the mount's NBD server (``--nbd``, ``nbd`` in the config; none by
    default) and the exports to make at start (``--export``, ``[exports.NAME]`` tables of
    the ``export`` command's arguments)."""
    exports = []
    for name, table in data.get("exports", {}).items():
        if not isinstance(table, dict):
            raise UsageError(f"config: [exports.{name}] must be a table of export arguments")
        exports.append(
            {
                "name": name,
                **{
                    key: str(value) if type(value) is int else value for key, value in table.items()
                },
            }
        )
    for text in args.export:
        try:
            exports.append(ctl.parse("export", text.encode()))
        except BlockError as exc:
            raise UsageError(f"--export '{text}': {exc}") from None
    where = args.nbd or data.get("nbd")
    try:
        server = parse_address(where) if where else None
        mode = socket_mode(args.nbd_mode or data.get("nbd-mode"))
        tls = (
            tls_setting(
                server,
                os.path.abspath(args.nbd_tls_creds)
                if args.nbd_tls_creds
                else data.get("nbd-tls-creds"),
                _flag(args.nbd_tls, data.get("nbd-tls")),
                _flag(args.nbd_tls_verify_peer, data.get("nbd-tls-verify-peer")),
                os.path.abspath(args.nbd_tls_authz)
                if args.nbd_tls_authz
                else data.get("nbd-tls-authz"),
            )
            if server is not None
            else PLAINTEXT
        )
    except BlockError as exc:
        raise UsageError(
            f"--nbd: {exc.message} (here: --nbd-tls-creds DIR, --nbd-tls-verify-peer on, "
            "--nbd-tls-authz FILE, --nbd-tls off)"
        ) from None

    def nbd(layer: BlockLayer, commands: Commands) -> NbdFrontend:
        return NbdFrontend(layer, commands, server, exports, mode, tls)

    return nbd


def _flag(given: str | None, config: Any) -> bool | None:
    """An on/off option from the command line, else the config's (a TOML boolean or
    "on"/"off"); None if neither says."""
    value = given if given is not None else config
    if value is None:
        return None
    try:
        return parse_bool(value)
    except ValueError:
        raise BlockError(errno.EINVAL, f"expected on or off, got {value!r}") from None


def create_args(name: str, options: str | None, read_only: bool = False) -> dict[str, Any]:
    """The ``create`` command's arguments for a configured backend: its options spelled as
    in ``.ctl/create``, read-only if the config says so; relative file names made absolute,
    as ``blkfs ctl`` makes them, so that the daemon names each image the same way whatever
    path later reaches it."""
    try:
        args = ctl.parse("create", f"{name} {options or ''}".encode())
    except BlockError as exc:
        raise UsageError(f"backend '{name}': {exc}") from None
    if isinstance(args.get("medium"), dict):
        _absolutize(args["medium"])
    if read_only:
        if "medium" not in args:
            raise UsageError(f"backend '{name}': read-only needs a medium")
        args["medium"]["read-only"] = True
    return args


def check_mountpoint(path: str, nonempty: bool = False) -> None:
    if not os.path.exists("/dev/fuse"):
        raise UsageError(
            "FUSE is not available: /dev/fuse is missing (load the fuse module; install fuse3)"
        )
    if _dead_fuse_mount(path):  # before anything stats it: ismount() is False on ENOTCONN
        raise UsageError(
            f"mountpoint {path} is a mount whose daemon died (Transport "
            f"endpoint is not connected); 'blkfs umount {path}' frees it"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is busy: something is already mounted there")
    hidden = os.listdir(path) if os.path.isdir(path) else []
    if hidden and not nonempty:
        raise UsageError(
            f"mountpoint {path} is not empty: the mount would hide "
            f"{len(hidden)} entr{'y' if len(hidden) == 1 else 'ies'} "
            f"({', '.join(sorted(hidden)[:3])}{', ...' if len(hidden) > 3 else ''})"
            "; mount on an empty directory, or add --nonempty"
        )
    os.makedirs(path, exist_ok=True)


def _dead_fuse_mount(path: str) -> bool:
    try:
        os.stat(path)
        if os.path.isdir(path):
            os.listdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def setup_logging(level: str, log_file: str | None, daemon: bool = False) -> str:
    """One line per event: to ``log_file``; else to stderr in the foreground, and as a daemon
    to syslog, which is also how the systemd journal takes it (its socket is
    ``$BLKFS_SYSLOG_SOCKET``, default /dev/log), or where the machine has neither, to a file
    in ``$XDG_STATE_HOME/blkfs`` (~/.local/state/blkfs). Returns where the log goes."""
    line = "%(levelname)s %(name)s: %(message)s"
    socket = os.environ.get("BLKFS_SYSLOG_SOCKET", "/dev/log")
    handler: logging.Handler
    if not log_file and daemon and os.path.exists(socket):
        handler = logging.handlers.SysLogHandler(address=socket)
        handler.setFormatter(logging.Formatter(f"blkfs[%(process)d]: {line}"))
        where = f"syslog ({socket})"
    else:
        if not log_file and daemon:
            state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
            state.joinpath("blkfs").mkdir(parents=True, exist_ok=True)
            log_file = str(state / "blkfs" / "blkfs.log")
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s blkfs[%(process)d] {line}"))
        where = log_file or "stderr"
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return where


def cmd_mount(args: argparse.Namespace) -> int:
    config, mountpoint = build_config(args)
    check_mountpoint(mountpoint, args.nonempty)
    if args.foreground:
        setup_logging(args.log_level, args.log_file)
        errors: list[str] = []

        def ready(message: str | None) -> None:
            if message:
                errors.append(message)
            else:
                notify_systemd(b"READY=1")

        failures = trio.run(Daemon(config).run, ready)
        if errors:
            raise UsageError(errors[0])
        if failures:
            raise UsageError(f"the final flush failed: {'; '.join(failures)}")
        return 0
    return daemonize(config, args)


def notify_systemd(state: bytes) -> None:
    """Tell systemd (a ``Type=notify`` unit, as ``blkfs@.service``) that the mount serves:
    a datagram to ``$NOTIFY_SOCKET`` (sd_notify(3)); nothing if systemd did not start us."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state, address)


def daemonize(config: DaemonConfig, args: argparse.Namespace) -> int:
    """Fork a daemon and wait until it reports that the mount serves, or why it does not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode()
        if report != "ok":
            os.waitpid(pid, 0)
            raise UsageError(report or "the daemon exited before the mount was ready")
        return 0
    os.close(read_end)
    os.setsid()
    setup_logging(args.log_level, args.log_file, daemon=True)

    def ready(message: str | None) -> None:
        os.write(write_end, (message or "ok").encode())
        os.close(write_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    status = 0
    try:
        if trio.run(Daemon(config).run, ready):
            status = 1  # the final flush failed: said in the log
    except BaseException:
        log.exception("daemon failed")
        status = 1
    os._exit(status)


# -- umount and ctl --------------------------------------------------------------------------


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


TREE_VERBS = ("create", "change", "insert")
"""Commands whose options may name host files."""


def absolute_filenames(text: str) -> str:
    """``NAME OPTIONS`` with every relative ``filename`` made absolute here: the daemon
    resolves names in its own working directory, not the caller's. Options that do not
    parse go as they are, for the daemon to say what is wrong."""
    name, _, options = text.strip().partition(" ")
    if not options.strip():
        return text
    try:
        tree = parse_options(options)
    except BlockError:
        return text
    if not _absolutize(tree):
        return text
    return f"{name} {json.dumps(tree)}"


def _absolutize(tree: dict[str, Any]) -> bool:
    changed = False
    for key, value in tree.items():
        if isinstance(value, dict):
            changed |= _absolutize(value)
        elif key == "filename" and isinstance(value, str) and not os.path.isabs(value):
            tree[key] = os.path.abspath(value)
            changed = True
    return changed


def cmd_ctl(args: argparse.Namespace) -> int:
    folder = Path(args.mountpoint, ".ctl")
    if args.command in ctl.REPORTS:
        try:
            sys.stdout.write(folder.joinpath(args.command).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {folder / args.command}: {exc.strerror}") from None
        return 0
    words = [
        f"{key}={os.path.abspath(path)}"
        if args.command == "export" and key in ("socket", "tls-creds", "tls-authz") and sep
        else word
        for word in args.args
        for key, sep, path in [word.partition("=")]
    ]
    text = absolute_filenames(" ".join(words)) if args.command in TREE_VERBS else " ".join(words)
    try:
        with open(folder / args.command, "wb", buffering=0) as f:
            f.write(text.encode())
    except OSError as exc:
        try:
            lines = folder.joinpath("error").read_text().splitlines()
        except OSError:
            lines = []
        raise UsageError(lines[-1] if lines else f"{args.command}: {exc.strerror}") from None
    return 0


# -- entry point ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="blkfs",
        description="Serve block backends (QEMU-style trees of driver nodes) as the files of a "
        "FUSE mount; take snapshots, run block jobs and handle image files from the shell.",
        epilog="As a mount helper (mount -t fuse.blkfs, /etc/fstab): "
        "blkfs CONFIG MOUNTPOINT [-o OPTIONS].",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {version('blkfs')}")
    sub = top.add_subparsers(dest="cmd", required=True)

    mount = sub.add_parser("mount", help="mount blkfs and serve backends as files")
    mount.add_argument(
        "mountpoint", nargs="?", help="where to mount (default: the config's 'mountpoint')"
    )
    mount.add_argument("--config", help="TOML file naming backends and options")
    mount.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="a backend to create at start (repeatable)",
    )
    mount.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users reach the mount (needs user_allow_other)",
    )
    mount.add_argument(
        "--image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="only open host images inside DIR (repeatable)",
    )
    mount.add_argument(
        "--allow-nbd",
        action="append",
        default=[],
        metavar="HOST:PORT|SOCKET-DIR",
        help="with --image-dir, let nbd nodes reach this NBD server, or the unix "
        "sockets in this directory (repeatable)",
    )
    mount.add_argument(
        "--nbd",
        metavar="unix:PATH|HOST:PORT",
        help="serve NBD here; exports go here unless they name a socket",
    )
    mount.add_argument(
        "--nbd-mode", metavar="MODE", help="permissions of the --nbd unix socket (default 0600)"
    )
    mount.add_argument(
        "--nbd-tls-creds",
        metavar="DIR",
        help="require TLS on the --nbd server, with the x509 credentials in DIR (ca-cert.pem, "
        "server-cert.pem, server-key.pem, as QEMU's tls-creds-x509)",
    )
    mount.add_argument(
        "--nbd-tls-verify-peer",
        metavar="on|off",
        help="with --nbd-tls-creds, require clients' certificates signed by DIR/ca-cert.pem",
    )
    mount.add_argument(
        "--nbd-tls-authz",
        metavar="FILE",
        help="with --nbd-tls-creds, let in only clients whose certificate's distinguished name "
        "a line of FILE matches (a glob, such as CN=host*.example.com,O=Example)",
    )
    mount.add_argument(
        "--nbd-tls",
        metavar="on|off",
        help="off: serve a TCP --nbd in plaintext (refused otherwise without --nbd-tls-creds)",
    )
    mount.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="'NAME [ARGS]'",
        help="export a backend over NBD at start, as .ctl/export (repeatable)",
    )
    mount.add_argument(
        "--qmp",
        metavar="unix:PATH",
        help="serve a QMP monitor on this unix socket (mode 0600); QEMU's "
        "socket,path=PATH spelling works too",
    )
    mount.add_argument(
        "--poll-max-ns",
        metavar="NS",
        help="busy-poll /dev/fuse for up to NS nanoseconds before sleeping, "
        f"adaptively, as QEMU's iothreads do (default {POLL_MAX_NS}; "
        "0: never)",
    )
    mount.add_argument(
        "--nonempty",
        action="store_true",
        help="mount even on a directory that is not empty (hiding it)",
    )
    mount.add_argument(
        "--log-file",
        help="write the log here (default: stderr in the "
        "foreground, syslog or the journal as a daemon)",
    )
    mount.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    mount.set_defaults(func=cmd_mount)

    umount = sub.add_parser("umount", help="drain, flush and unmount")
    umount.add_argument("mountpoint")
    umount.add_argument(
        "--force",
        action="store_true",
        help="eject backends whose device does not answer (their requests fail with EIO), "
        "then unmount",
    )
    umount.set_defaults(func=cmd_umount)

    commands = sub.add_parser(
        "ctl",
        help="send a .ctl command (or read a report)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(
            f"  {verb} {COMMANDS[verb].usage()}\n      {COMMANDS[verb].help.splitlines()[0]}"
            for verb in ctl.VERBS
        )
        + f"\nreports: {', '.join(ctl.REPORTS)}",
    )
    commands.add_argument("mountpoint")
    commands.add_argument("command", choices=ctl.VERBS + ctl.REPORTS)
    commands.add_argument("args", nargs="*")
    commands.set_defaults(func=cmd_ctl)

    jobs.add_parsers(sub)
    image.add_parser(sub)
    volume_command.add_parsers(sub)
    completion.add_to(top)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if mount_helper.is_helper_call(argv, set(_commands(top))):
            argv = mount_helper.mount_argv(argv)
    except mount_helper.HelperError as exc:
        fail(str(exc))
    args = top.parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # a pipe's buffer: a reader that went away shows here, not at exit
        return status
    except (UsageError, BlockError, jobs.JobError) as exc:
        fail(str(exc))
    except BrokenPipeError:  # the reader went away (| head): end quietly, as other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # a shell's status for SIGPIPE
    except KeyboardInterrupt:
        return 130


def _commands(top: argparse.ArgumentParser) -> list[str]:
    """The command names ``top`` takes as its first word."""
    return [
        name
        for action in top._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]
