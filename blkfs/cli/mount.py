"""``blkfs mount``: returns only once the mount serves (or has failed, with the reason),
daemonizing unless ``--foreground``; the daemon logs one line per event, to syslog (and so
the journal) unless told otherwise, and tells systemd when it serves."""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path

import trio

from blkfs.cli.errors import UsageError
from blkfs.cli.mount_config import build_config
from blkfs.daemon import Daemon, DaemonConfig
from blkfs.frontends.fuse import POLL_MAX_NS

log = logging.getLogger("blkfs")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
