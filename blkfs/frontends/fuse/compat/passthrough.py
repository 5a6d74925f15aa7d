"""The kernel's FUSE passthrough (Linux 6.9+) for a pyfuse3 session over libfuse 3.14.

With passthrough, the kernel serves read, write, splice and mmap of an open file straight
from a host file (a "backing file") and never asks the daemon. It takes three steps, none of
which libfuse 3.14 or pyfuse3 offers (libfuse 3.16 added ``fuse_passthrough_open``):

1. INIT: the reply sets ``FUSE_PASSTHROUGH`` (bit 37: bit 5 of ``flags2``, read by the
   kernel only with ``FUSE_INIT_EXT``) and ``max_stack_depth`` (1: backing files lie on
   filesystems that stack on nothing; one on overlayfs is refused with ELOOP);
2. ``FUSE_DEV_IOC_BACKING_OPEN`` on the /dev/fuse descriptor registers a host file and
   gives its backing id (``FUSE_DEV_IOC_BACKING_CLOSE`` drops it: open files keep theirs);
3. the open reply sets ``FOPEN_PASSTHROUGH`` with that id in ``fuse_open_out.backing_id``
   (libfuse 3.14 still calls it ``padding`` and writes 0).

libfuse sends every reply with one ``writev(fd, iov, 2)``, header then argument, through its
GOT slot for ``writev`` (found as :mod:`.extra_ops` finds pyfuse3's). Steps 1 and 3 point
that slot at a hook for the moment of one reply only: from :meth:`Passthrough.negotiate` to
the INIT reply, and from :meth:`Passthrough.reply_open` to that open's reply, which pyfuse3
sends, on the trio thread, right after the ``open`` handler returns, with no await between.
The hook edits only a reply that matches (its length, on the trio thread, the ``fh`` named)
and forwards every other call unchanged (another thread's notification, say), calling libc's
``writev`` directly: a lazily bound slot's resolver would overwrite the hook.

The kernel's rules a caller keeps (fs/fuse/iomode.c, passthrough.c, Linux 6.18):
``FOPEN_DIRECT_IO`` overrides passthrough for read and write, so a passthrough open is not
direct_io; while an inode has a passthrough open, every open of it must be passthrough too
(else EIO), with the same backing file; BACKING_OPEN needs CAP_SYS_ADMIN. Each passthrough
file opens the backing file again, by its path, with the opener's flags (O_DIRECT included)
and the credentials of the daemon at BACKING_OPEN.

Checked with pyfuse3 3.5 and libfuse 3.14 on x86-64, Linux 6.18. Fallback: if the slot is
not found, or INIT does not offer passthrough, :attr:`Passthrough.unavailable` says why and
no open asks for it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading

from blkfs.frontends.fuse.compat.extra_ops import _GotSlot, got_slot

log = logging.getLogger("blkfs.fuse")

FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
FUSE_INIT_EXT = 1 << 30
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PASSTHROUGH_FLAGS2 = 1 << (37 - 32)
FOPEN_PASSTHROUGH = 1 << 7
MAX_STACK_DEPTH = 1
_HEADER = struct.Struct("<IiQ")  # fuse_out_header: len, error, unique
_INIT_OUT_SIZE = 64  # fuse_init_out for protocol 7.23 and later
_INIT_FLAGS, _INIT_FLAGS2, _INIT_STACK_DEPTH = 12, 32, 36
_OPEN_OUT = struct.Struct("<QIi")  # fuse_open_out: fh, open_flags, backing_id

_WRITEV = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, use_errno=True
)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc_writev = ctypes.CDLL(None, use_errno=True).writev
_libc_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc_writev.restype = ctypes.c_ssize_t


def _libfuse_path() -> str | None:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and "/libfuse3.so" in fields[5]:
                return os.path.realpath(fields[5].rstrip("\n"))
    return None


def _writev_slot() -> _GotSlot | None:
    """libfuse's GOT slot for ``writev``, or None (the reason logged)."""
    path = _libfuse_path()
    if path is None:
        log.warning("passthrough: libfuse3 is not loaded")
        return None
    found = got_slot(path, b"writev", "passthrough")
    return None if found is None else found[1]


class Passthrough:
    """Passthrough for the one FUSE session of this process."""

    def __init__(self) -> None:
        self.unavailable: str | None = "the session has not answered INIT yet"
        """Why opens cannot be passthrough (None: they can), known once INIT is answered."""
        self.fd = -1
        """The /dev/fuse descriptor (libfuse's, seen in the INIT reply)."""
        self._slot = _writev_slot()
        self._thread = threading.get_ident()
        self._pending: dict[int, int] = {}
        """Open replies to edit: backing id by ``fh``."""
        self._init_seen = False
        self._hook = _WRITEV(self._writev)
        self._hook_address = ctypes.cast(self._hook, ctypes.c_void_p).value or 0

    def negotiate(self) -> None:
        """Ask for passthrough in the INIT reply: call on the trio thread before that reply
        is sent (pyfuse3's ``Operations.init`` is such a place)."""
        if self._slot is None:
            self.unavailable = "libfuse's reply path was not found (see the log)"
            return
        self._thread = threading.get_ident()
        self._patch()

    def open_backing(self, host_fd: int) -> int:
        """Register the host file behind ``host_fd`` with the kernel; its backing id."""
        arg = bytearray(struct.pack("<iIQ", host_fd, 0, 0))
        backing_id: int = fcntl.ioctl(self.fd, FUSE_DEV_IOC_BACKING_OPEN, arg, True)
        return backing_id

    def close_backing(self, backing_id: int) -> None:
        """Drop the id; files opened with it keep their backing file until they close."""
        fcntl.ioctl(self.fd, FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))

    def reply_open(self, fh: int, backing_id: int) -> None:
        """Have the reply to the open that is returning ``fh`` now ask for passthrough."""
        assert self._slot is not None and self.unavailable is None
        self._pending[fh] = backing_id
        self._patch()

    def forget(self, fh: int) -> bool:
        """``fh`` is released; True if its open reply was never edited (a bug)."""
        missed = self._pending.pop(fh, None) is not None
        if not self._pending:
            self._restore()
        return missed

    def _patch(self) -> None:
        assert self._slot is not None
        if not self._slot.patched:
            self._slot.patch(self._hook_address)

    def _restore(self) -> None:
        if self._slot is not None:
            self._slot.restore()

    def _writev(self, fd: int, iov: int, count: int) -> int:
        """libfuse's writev while patched; never raises (ctypes would only print it)."""
        init = False
        try:
            if count == 2 and threading.get_ident() == self._thread:
                vec = (_Iovec * 2).from_address(iov)
                length, error, _ = _HEADER.unpack(ctypes.string_at(vec[0].base, _HEADER.size))
                if error == 0 and length == _HEADER.size + vec[1].len:
                    if not self._init_seen:
                        init = self._init_seen = True
                        self._edit_init(vec[1])
                    elif vec[1].len == _OPEN_OUT.size:
                        self._edit_open(vec[1])
        except Exception:
            log.exception("passthrough: editing a reply failed")
        result: int = _libc_writev(fd, iov, count)
        if init:
            self._probe(fd)
        return result

    def _edit_init(self, arg: _Iovec) -> None:
        if not self._pending:
            self._restore()
        if arg.len != _INIT_OUT_SIZE:
            self.unavailable = "the kernel speaks a FUSE protocol older than 7.23"
            return
        out = (ctypes.c_char * arg.len).from_address(arg.base)
        (flags,) = struct.unpack_from("<I", out, _INIT_FLAGS)
        if not flags & FUSE_INIT_EXT:  # libfuse sets it only if the kernel offered it
            self.unavailable = "the kernel has no FUSE passthrough (it needs Linux 6.9+)"
            return
        if flags & FUSE_WRITEBACK_CACHE:
            self.unavailable = "the mount uses writeback caching"
            return
        (flags2,) = struct.unpack_from("<I", out, _INIT_FLAGS2)
        struct.pack_into(
            "<II", out, _INIT_FLAGS2, flags2 | FUSE_PASSTHROUGH_FLAGS2, MAX_STACK_DEPTH
        )
        self.unavailable = None

    def _probe(self, fuse_fd: int) -> None:
        """Right after the INIT reply (which the kernel has taken in by now), ask whether
        the kernel took passthrough: closing backing id 0 fails with EINVAL if it did,
        EPERM if it did not or the daemon lacks CAP_SYS_ADMIN, ENOTTY on an older kernel."""
        self.fd = fuse_fd
        if self.unavailable is None:
            try:
                fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("<I", 0))
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    self.unavailable = "the kernel requires CAP_SYS_ADMIN, which the daemon lacks"
                elif exc.errno == errno.ENOTTY:
                    self.unavailable = "the kernel has no FUSE passthrough (it needs Linux 6.9+)"
                elif exc.errno != errno.EINVAL:
                    self.unavailable = f"the kernel refused its passthrough ioctl: {exc.strerror}"
        log.info("FUSE passthrough: %s", self.unavailable or "available")

    def _edit_open(self, arg: _Iovec) -> None:
        out = (ctypes.c_char * arg.len).from_address(arg.base)
        fh, open_flags, _ = _OPEN_OUT.unpack_from(out)
        backing_id = self._pending.pop(fh, None)
        if backing_id is None:
            return
        _OPEN_OUT.pack_into(out, 0, fh, open_flags | FOPEN_PASSTHROUGH, backing_id)
        if not self._pending:
            self._restore()
