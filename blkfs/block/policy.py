"""Which host files the graph may open: the ``--image-dir`` allowlist.

The check runs on the opened descriptor (``/proc/self/fd``), not only on the name, so a
symlink or ``..`` swapped in between check and open cannot lead outside the allowlist. A hard
link cannot be told from its other names, so with an allowlist a regular file with more than
one link is refused. Every host file goes through here: those the user names and those an
image names (backing files).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from blkfs.errors import BlockError, from_oserror


class HostPolicy:
    """Opens host image files, refusing any outside ``image_dirs`` (None: no restriction)."""

    def __init__(self, image_dirs: Iterable[str] | None = None) -> None:
        self.image_dirs = (None if image_dirs is None
                           else tuple(os.path.realpath(d) for d in image_dirs))

    def _inside(self, real: str) -> bool:
        """Whether an already resolved path lies inside the allowlist."""
        assert self.image_dirs is not None
        return any(real == d or real.startswith(d.rstrip("/") + "/") for d in self.image_dirs)

    def _refuse(self, path: str) -> BlockError:
        dirs = ", ".join(self.image_dirs or ())
        return BlockError(errno.EACCES, f"'{path}' is outside the image directories ({dirs})")

    def open(self, path: str, writable: bool) -> int:
        """A descriptor for the image at ``path``; BlockError with a fitting errno if not."""
        if self.image_dirs is not None:
            try:
                named = os.path.realpath(path)
            except OSError:  # swapped while being resolved: the descriptor check decides
                named = None
            if named is not None and not self._inside(named):
                raise self._refuse(path)  # before opening: no hint whether it exists
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except IsADirectoryError:
            raise BlockError(errno.EINVAL, f"'{path}' is a directory, not an image") from None
        except OSError as exc:
            raise from_oserror(exc, f"cannot open '{path}'") from None
        try:
            # the kernel's name of the file actually opened; resolving it again would
            # follow whatever symlink was swapped in since
            if self.image_dirs is not None and \
                    not self._inside(os.readlink(f"/proc/self/fd/{fd}")):
                raise self._refuse(path)
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise BlockError(errno.EINVAL, f"'{path}' is not a regular file or block device")
            if self.image_dirs is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise BlockError(errno.EACCES, f"'{path}' has {st.st_nlink} hard links; with "
                                               "image directories, only files with one link "
                                               "are opened (another link may lie outside)")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
