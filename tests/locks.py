"""Which of QEMU's lock bytes an image file has taken, as another process sees them."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

_FLOCK = "hhqqi4x"
PERMS = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}


def lock_bytes(path: Path) -> tuple[set[str], set[str]]:
    """(permissions held, permissions unshared) by every other open file description of
    ``path``: bytes 100+n and 200+n, probed one at a time with F_OFD_GETLK."""
    fd = os.open(path, os.O_RDONLY)
    try:

        def taken(offset: int) -> bool:
            probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            return (
                struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
            )

        return (
            {name for n, name in PERMS.items() if taken(100 + n)},
            {name for n, name in PERMS.items() if taken(200 + n)},
        )
    finally:
        os.close(fd)
