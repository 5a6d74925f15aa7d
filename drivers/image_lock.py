"""QEMU's image locking, so blkfs and QEMU never write one image at the same time.

QEMU (block/file-posix.c, ``raw_apply_lock_bytes``) takes shared open-file-description locks
on single bytes of every image it opens: byte 100+n while the node holds permission n, byte
200+n while it refuses to share permission n with anyone else (n = 0..3, the bits of
:class:`~blkfs.block.perm.Perm`). A user conflicts with a holder when it takes a permission
the holder does not share, or refuses one the holder holds. The bytes follow the node's
permissions as they change (``raw_handle_perm_lock``): a change first takes the union of the
old and new bytes and checks, then drops what is no longer needed, so that nobody can slip in
between. OFD locks belong to an open file description, so two nodes of one blkfs conflict
the same way as two processes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from blkfs.block.perm import ALL, PERM_NAMES, Perm

PERM_BASE = 100
SHARED_BASE = 200
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
    l_type: int = struct.unpack(_FLOCK, answer)[0]
    return l_type


def lock_bytes(perm: Perm, shared: Perm) -> set[int]:
    """The bytes a node holding ``perm`` and sharing ``shared`` locks."""
    return {PERM_BASE + bit.value.bit_length() - 1 for bit in PERM_NAMES if bit in perm} | {
        SHARED_BASE + bit.value.bit_length() - 1 for bit in PERM_NAMES if bit not in shared & ALL
    }


class ImageLocks:
    """The lock bytes one descriptor holds, changed as QEMU changes them."""

    def __init__(self) -> None:
        self.held: set[int] = set()
        self._before: set[int] | None = None

    def prepare(self, fd: int, perm: Perm, shared: Perm) -> None:
        """Take the bytes for ``perm``/``shared`` beside those held, and check that no other
        open file description refuses what we need or holds what we refuse; LockConflict
        (with nothing changed) if one does."""
        wanted = lock_bytes(perm, shared)
        self._before = set(self.held)
        try:
            for offset in sorted(wanted - self.held):
                _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
                self.held.add(offset)
            for bit, name in PERM_NAMES.items():
                number = bit.value.bit_length() - 1
                if bit in perm and self._taken(fd, SHARED_BASE + number):
                    raise LockConflict(f'failed to get "{name}" lock')
                if bit not in shared & ALL and self._taken(fd, PERM_BASE + number):
                    raise LockConflict(f'failed to get shared "{name}" lock')
        except BaseException:
            self.abort(fd)
            raise

    def commit(self, fd: int, perm: Perm, shared: Perm) -> None:
        """Keep only the bytes ``perm``/``shared`` need (after :meth:`prepare`)."""
        self._release(fd, self.held - lock_bytes(perm, shared))
        self._before = None

    def abort(self, fd: int) -> None:
        """Back to the bytes held before :meth:`prepare`."""
        if self._before is not None:
            self._release(fd, self.held - self._before)
            self._before = None

    def copy_to(self, fd: int) -> None:
        """Take the same bytes on another descriptor of the file (a reopen's new one)."""
        for offset in sorted(self.held):
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)

    def _release(self, fd: int, offsets: set[int]) -> None:
        for offset in sorted(offsets):
            _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)
            self.held.discard(offset)

    @staticmethod
    def _taken(fd: int, offset: int) -> bool:
        """Whether another open file description holds ``offset`` (ours never conflict)."""
        return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK
