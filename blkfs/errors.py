"""The one error family of blkfs, shared by both APIs.

Control-path failures (a bad option, an unknown backend) carry a sentence for the user;
data-path failures carry the errno that the frontend hands back to the kernel. Both are a
:class:`BlockError`; the FUSE frontend is the only place that turns it into ``FUSEError``.
"""

from __future__ import annotations

import errno as _errno
import os


class BlockError(Exception):
    """An operation failed and changed nothing it did not say it changed.

    ``errno`` is what a frontend reports (EINVAL, ENOENT, EIO, ...); ``str(err)`` is the
    message for the user, naming the offending value.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno))
        self.errno = errno

    @property
    def message(self) -> str:
        return str(self)


class OptionError(BlockError):
    """An option is unknown, missing or ill-typed: the user's mistake, found before opening."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class LastingError(BlockError):
    """A failure that retrying cannot cure: a host flush that failed (the kernel may have
    dropped what it could not write back). An error policy reports it, never retries it."""


class NotFound(BlockError):
    """ENOENT for a name: no ``kind`` ("backend", "node" or "job") named ``name``. A
    frontend reports it in its own terms (QMP's DeviceNotFound, DeviceNotActive)."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(_errno.ENOENT, message)
        self.kind = kind
        self.name = name


def from_oserror(exc: OSError, what: str) -> BlockError:
    """Translate a host error into a BlockError whose message says which file or request."""
    code = exc.errno or _errno.EIO
    return BlockError(code, f"{what}: {os.strerror(code)}")
