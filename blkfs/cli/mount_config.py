"""The configuration of a ``blkfs mount``: its ``--config`` TOML file and the command line's
flags, which add to it, checked and turned into the daemon's :class:`DaemonConfig` before
anything starts (a mistake is a :class:`UsageError` and nothing runs)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import tomllib
from typing import Any

from blkfs.backend import parse_bool
from blkfs.cli.control import absolutize
from blkfs.cli.errors import UsageError
from blkfs.commands import Commands
from blkfs.daemon import DaemonConfig, ExporterFactory, FrontendFactory
from blkfs.errors import BlockError
from blkfs.frontends import ctl
from blkfs.frontends.fuse import POLL_MAX_NS, FuseFrontend
from blkfs.frontends.nbd import NbdFrontend
from blkfs.frontends.nbd.export import PLAINTEXT, parse_address, socket_mode, tls_setting
from blkfs.layer import BlockLayer

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
    from blkfs.frontends.qmp import QmpFrontend, parse_address  # only a mount that serves QMP

    try:
        path = os.path.abspath(parse_address(where))
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
        absolutize(args["medium"])
    if read_only:
        if "medium" not in args:
            raise UsageError(f"backend '{name}': read-only needs a medium")
        args["medium"]["read-only"] = True
    return args
