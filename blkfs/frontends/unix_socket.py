"""What the socket frontends (the NBD export, the QMP monitor) share about a unix socket."""

from __future__ import annotations

import errno
import os
import socket
import stat

import trio


async def clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody listens on any more (a daemon that was killed); anything
    else at ``path`` is an error."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
