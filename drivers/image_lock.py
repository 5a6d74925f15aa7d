"""QEMU's image locking, so blkfs and QEMU never write one image at the same time.

QEMU (block/file-posix.c) takes shared open-file-description locks on single bytes of every
image it opens: byte 100+n while it holds permission n, byte 200+n while it refuses to share
permission n with anyone else. A user conflicts with a holder when it takes a permission the
holder does not share, or refuses one the holder holds. Doing the same makes ``qemu-img`` refuse
an image that blkfs writes (``Failed to get "write" lock``), and blkfs refuse one a VM writes.
OFD locks belong to an open file description, so two nodes of one blkfs conflict the same way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, RESIZE = 0, 1, 3
"""Bit numbers of QEMU's BLK_PERM_CONSISTENT_READ, BLK_PERM_WRITE and BLK_PERM_RESIZE."""
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


class LockConflict(Exception):
    """Another user of the image holds or refuses a permission we need."""


class LocksUnsupported(Exception):
    """The host filesystem has no OFD locks."""


def _fcntl(fd: int, command: int, kind: int, offset: int) -> int:
    """One flock call on a single byte; returns the l_type the kernel answers."""
    try:
        answer = fcntl.fcntl(fd, command, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise LocksUnsupported(os.strerror(exc.errno)) from None
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise LockConflict(f"byte {offset} is locked exclusively") from None
        raise
    return struct.unpack(_FLOCK, answer)[0]


def lock_image(fd: int, writable: bool) -> None:
    """Take QEMU's locks: a reader holds consistent read and shares everything (as
    ``qemu-img info`` and ``qemu-io -r`` do); a writer holds read, write and resize and shares
    neither write nor resize (as a VM's disk does). Raises LockConflict; closing the
    descriptor drops whatever was taken."""
    held = (CONSISTENT_READ, WRITE, RESIZE) if writable else (CONSISTENT_READ,)
    unshared = (WRITE, RESIZE) if writable else ()
    for offset in [PERM_BASE + n for n in held] + [SHARED_BASE + n for n in unshared]:
        _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
    names = {CONSISTENT_READ: "consistent read", WRITE: "write", RESIZE: "resize"}
    for n in held:
        if _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, SHARED_BASE + n) != fcntl.F_UNLCK:
            raise LockConflict(f"another user refuses to share the {names[n]} permission")
    for n in unshared:
        if _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE + n) != fcntl.F_UNLCK:
            raise LockConflict(f"another user holds the {names[n]} permission")
