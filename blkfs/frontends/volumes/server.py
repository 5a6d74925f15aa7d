"""HTTP/1.1 over a unix socket, one thread per connection: Docker's plugin client keeps its
connection open, and one volume's slow step (mkfs, a commit job) must not hold up another's
``Mount``. The operations lock what they touch (:mod:`.volumes`)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import FrameType

from blkfs.errors import BlockError

from . import protocol
from .volumes import Volumes

log = logging.getLogger("blkfs.volumes")


class PluginServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, volumes: Volumes) -> None:
        self.volumes = volumes
        super().__init__(str(path), RequestHandler)


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PluginServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, reply = protocol.handle(self.server.volumes, self.path, body)
        if reply.get("Err"):
            log.error("%s: %s", self.path, reply["Err"])
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", protocol.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("request: " + format, *args)

    def address_string(self) -> str:
        return "unix"  # a unix socket's peer has no address


def clear_stale_socket(path: Path) -> None:
    """Remove a socket nobody listens on (a plugin that was killed); a live one, or
    anything that is not a socket, is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BlockError(errno.EEXIST, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            return
    raise BlockError(errno.EADDRINUSE, f"{path}: another plugin serves there")


def serve(volumes: Volumes, path: Path) -> None:
    """Serve until SIGTERM or SIGINT; the socket goes, the volumes stay as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_socket(path)
    server = PluginServer(path, volumes)
    os.chmod(path, 0o600)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("volume plugin serving on %s", path)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        path.unlink(missing_ok=True)
        log.info("volume plugin stopped")
