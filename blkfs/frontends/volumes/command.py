"""``blkfs volume-plugin`` (serve Docker's volume plugin protocol) and ``blkfs volume VERB``
(blkfs's own per-volume verbs, sent to the running plugin over its socket)."""

from __future__ import annotations

import argparse
import errno
import http.client
import json
import logging
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from blkfs.errors import BlockError

from .server import serve
from .volumes import Volumes

SOCKET = "/run/docker/plugins/blkfs.sock"
"""Where dockerd looks for the plugin named ``blkfs``."""
STATE = "/var/lib/blkfs/volumes"
CONFIG_KEYS = {"socket", "state-dir", "mount", "image-dirs", "log-file", "log-level"}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plugin = sub.add_parser(
        "volume-plugin",
        help="serve blkfs volumes to Docker (its volume plugin protocol)",
        description="Serve Docker's volume plugin protocol on a unix socket: docker volume "
        "create -d blkfs makes a qcow2 volume, docker run -v NAME:/data mounts it.",
    )
    plugin.add_argument("--config", help="TOML file; its [volume-plugin] section")
    plugin.add_argument("--socket", help=f"the socket to serve on (default {SOCKET})")
    plugin.add_argument("--state-dir", help=f"volumes, images and mounts (default {STATE})")
    plugin.add_argument(
        "--mount", help="serve the volumes from this blkfs mount (default: its own)"
    )
    plugin.add_argument(
        "--image-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="where base=IMAGE may come from, besides the state directory (repeatable)",
    )
    plugin.add_argument("--log-file", help="write the log here (default: stderr)")
    plugin.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    plugin.set_defaults(func=cmd_plugin)

    volume = sub.add_parser("volume", help="snapshot, roll back, commit, clone, inspect a volume")
    verbs = volume.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("snapshot", "a live snapshot (the filesystem frozen for its moment)"),
        ("rollback", "drop what was written since the last snapshot"),
        ("commit", "keep what was written since the last snapshot (merge it down, live)"),
        ("clone", "a thin clone: a new volume over a snapshot of this one"),
        ("inspect", "chain, size, host space, users and snapshots, as JSON"),
    ):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("--socket", default=SOCKET, help=f"the plugin's (default {SOCKET})")
        parser.add_argument("name", metavar="SOURCE" if verb == "clone" else "NAME")
        if verb == "rollback":
            parser.add_argument(
                "--remount",
                action="store_true",
                help="unmount, roll back and mount again (only when no container holds it)",
            )
        if verb == "clone":
            parser.add_argument("new", metavar="NAME")
            parser.add_argument(
                "-o",
                dest="opts",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="as docker volume create -o (size, fs, keep, throttle.LIMIT)",
            )
        parser.set_defaults(func=cmd_volume)


def cmd_plugin(args: argparse.Namespace) -> int:
    config = plugin_config(args.config)
    logging.basicConfig(
        filename=args.log_file or config.get("log-file"),
        level=(args.log_level or config.get("log-level", "info")).upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    mount = args.mount or config.get("mount")
    volumes = Volumes(
        Path(args.state_dir or config.get("state-dir", STATE)),
        Path(mount) if mount else None,
        [Path(d) for d in [*config.get("image-dirs", []), *args.image_dir]],
    )
    volumes.recover()
    serve(volumes, Path(args.socket or config.get("socket", SOCKET)))
    return 0


def plugin_config(path: str | None) -> dict[str, Any]:
    """The ``[volume-plugin]`` section of a config file (the command line overrides it)."""
    if path is None:
        return {}
    try:
        section: dict[str, Any] = tomllib.loads(Path(path).read_text()).get("volume-plugin", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BlockError(errno.EINVAL, f"--config {path}: {exc}") from None
    unknown = set(section) - CONFIG_KEYS
    if unknown:
        raise BlockError(errno.EINVAL, f"[volume-plugin]: unknown key {sorted(unknown)[0]!r}")
    return section


def cmd_volume(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"Name": args.name}
    if args.verb == "rollback":
        body["Remount"] = args.remount
    if args.verb == "clone":
        body = {"Source": args.name, "Name": args.new, "Opts": dict(_pairs(args.opts))}
    reply = call(Path(args.socket), f"/BlkfsVolume.{args.verb.capitalize()}", body)
    for field in ("Volume", "Snapshot"):
        if field in reply:
            json.dump(reply[field], sys.stdout, indent=2)
            print()
    return 0


def _pairs(words: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise BlockError(errno.EINVAL, f"-o {word}: KEY=VALUE is needed")
        pairs.append((key, value))
    return pairs


class UnixConnection(http.client.HTTPConnection):
    """HTTP to a unix socket."""

    def __init__(self, path: Path, timeout: float = 600) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def call(path: Path, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request to the plugin; BlockError with its reason when it failed."""
    connection = UnixConnection(path)
    try:
        connection.request("POST", endpoint, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply: dict[str, Any] = json.loads(response.read())
    except OSError as exc:
        raise BlockError(errno.ECONNREFUSED, f"no volume plugin on {path}: {exc}") from None
    finally:
        connection.close()
    if reply.get("Err"):
        raise BlockError(int(reply.get("Errno") or errno.EIO), str(reply["Err"]))
    return reply
