"""Which host files the graph may open: the ``--image-dir`` allowlist.

The check runs on the opened descriptor (``/proc/self/fd``), not only on the name, so a
symlink or ``..`` swapped in between check and open cannot lead outside the allowlist. Every
host file goes through here: those the user names and those an image names (backing files).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterable

from blkfs.errors import BlockError, from_oserror


class HostPolicy:
    """Opens host image files, refusing any outside ``image_dirs`` (None: no restriction)."""

    def __init__(self, image_dirs: Iterable[str] | None = None) -> None:
        self.image_dirs = (None if image_dirs is None
                           else tuple(os.path.realpath(d) for d in image_dirs))

    @staticmethod
    def key(path: str) -> str:
        """The identity of a host file for remembering facts about it (symlinks resolved)."""
        return os.path.realpath(path)

    def allows(self, path: str) -> bool:
        if self.image_dirs is None:
            return True
        real = os.path.realpath(path)
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.image_dirs)

    def _refuse(self, path: str) -> BlockError:
        dirs = ", ".join(self.image_dirs or ())
        return BlockError(errno.EACCES, f"'{path}' is outside the image directories ({dirs})")

    def open(self, path: str, writable: bool) -> int:
        """A descriptor for the image at ``path``; BlockError with a fitting errno if not."""
        if not self.allows(path):
            raise self._refuse(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except IsADirectoryError:
            raise BlockError(errno.EINVAL, f"'{path}' is a directory, not an image") from None
        except OSError as exc:
            raise from_oserror(exc, f"cannot open '{path}'") from None
        try:
            if not self.allows(os.readlink(f"/proc/self/fd/{fd}")):
                raise self._refuse(path)
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise BlockError(errno.EINVAL, f"'{path}' is not a regular file or block device")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
