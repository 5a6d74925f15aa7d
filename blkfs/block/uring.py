"""A small io_uring over ctypes: the setup and enter system calls and the mmap'd rings.

Layouts are the kernel's (``<linux/io_uring.h>``); only what the ``file`` driver needs is
here: reads and writes at an address, fdatasync, an eventfd the kernel signals when a
completion waits, and the completion queue read from the loop. The rings are shared with the
kernel: the index stores rely on x86-64's ordering of stores and of loads (a store-release
and a load-acquire there are plain moves), so :class:`Ring` refuses other machines.

A buffer given to the kernel must stay put until its completion: :class:`Pinned` holds the
buffer protocol's export (the memory cannot move or be freed, a bytearray cannot be resized)
until it is released, which the caller does only on the completion.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
"""The same numbers on every architecture but alpha (the generic system call table)."""

OP_FSYNC = 3
OP_READ = 22
OP_WRITE = 23
FSYNC_DATASYNC = 1

SETUP_CQSIZE = 1 << 3
SETUP_COOP_TASKRUN = 1 << 8
SETUP_TASKRUN_FLAG = 1 << 9
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
FEAT_SINGLE_MMAP = 1 << 0
FEAT_NODROP = 1 << 1
ENTER_GETEVENTS = 1 << 0
REGISTER_EVENTFD = 4
REGISTER_IOWQ_MAX_WORKERS = 19
SQ_CQ_OVERFLOW = 1 << 1
SQ_TASKRUN = 1 << 2
OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000

SQE = struct.Struct("=BBHiQQIIQ24x")
"""opcode, flags, ioprio, fd, off, addr, len, op flags, user_data; 64 bytes."""
CQE = struct.Struct("=Qi4x")
"""user_data, res (flags unused); 16 bytes."""


class _SqOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags")
    ] + [("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (part of the stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long] * 7
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
PYBUF_WRITABLE = 1


class Pinned:
    """A buffer held in place for the kernel: :attr:`address` and :attr:`length` stay
    valid until :meth:`release`."""

    __slots__ = ("_view", "address", "length")

    def __init__(self, buf: memoryview, writable: bool) -> None:
        self._view = _PyBuffer()
        _get_buffer(buf, ctypes.byref(self._view), PYBUF_WRITABLE if writable else 0)
        self.address: int = self._view.buf or 0
        self.length: int = self._view.len

    def release(self) -> None:
        _release_buffer(ctypes.byref(self._view))


def _syscall(number: int, *args: int) -> int:
    """syscall(2) with up to six arguments (the unused ones zero)."""
    result: int = _libc.syscall(number, *args, *(0,) * (6 - len(args)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Ring:
    """One io_uring instance: :meth:`push` requests, :meth:`submit` them, :meth:`reap`
    completions. Used from one thread (``SINGLE_ISSUER`` where the kernel has it)."""

    def __init__(self, entries: int = 64, cq_entries: int = 1024) -> None:
        if platform.machine() != "x86_64":
            raise OSError(
                errno.ENOSYS, f"io_uring rings are x86-64 only here, not {platform.machine()}"
            )
        self.fd = -1
        for flags in (
            SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN | SETUP_TASKRUN_FLAG,
            SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG,
            0,
        ):
            params = _Params(flags=flags | SETUP_CQSIZE, cq_entries=cq_entries)
            try:
                self.fd = _syscall(SYS_IO_URING_SETUP, entries, ctypes.addressof(params))
                break
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if self.fd < 0:
            raise OSError(errno.EINVAL, "io_uring_setup refused every set of flags")
        self._maps: list[mmap.mmap] = []
        try:
            if not params.features & FEAT_SINGLE_MMAP or not params.features & FEAT_NODROP:
                raise OSError(errno.ENOSYS, "io_uring too old (no single mmap or no NODROP)")
            sq, cq = params.sq_off, params.cq_off
            size = max(sq.array + params.sq_entries * 4, cq.cqes + params.cq_entries * CQE.size)
            self._rings = self._map(size, OFF_SQ_RING)
            self._sqes = self._map(params.sq_entries * SQE.size, OFF_SQES)
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._attach(params)
        except BaseException:
            self.close()
            raise

    def _attach(self, params: _Params) -> None:
        """Views of the ring indices, the identity slot array, the eventfd registered."""
        sq, cq = params.sq_off, params.cq_off
        word = ctypes.c_uint32.from_buffer
        self._sq_tail = word(self._rings, sq.tail)
        self._sq_head = word(self._rings, sq.head)
        self._sq_flags = word(self._rings, sq.flags)
        self._cq_head = word(self._rings, cq.head)
        self._cq_tail = word(self._rings, cq.tail)
        self.sq_entries = params.sq_entries
        self.cq_entries = params.cq_entries
        self._sq_mask = word(self._rings, sq.ring_mask).value
        self._cq_mask = word(self._rings, cq.ring_mask).value
        self._cqes = cq.cqes
        array = (ctypes.c_uint32 * params.sq_entries).from_buffer(self._rings, sq.array)
        for index in range(params.sq_entries):
            array[index] = index  # SQE i in slot i, once for all
        del array
        self.pending = 0
        """Pushed and not yet submitted."""
        eventfd = ctypes.c_int(self.eventfd)
        _syscall(SYS_IO_URING_REGISTER, self.fd, REGISTER_EVENTFD, ctypes.addressof(eventfd), 1)

    def limit_workers(self, bounded: int) -> None:
        """At most ``bounded`` kernel workers (io-wq) for requests that had to leave the
        submitting thread, on regular files and block devices (io-wq's "bounded" class;
        its default, 4 per CPU, is what one hung device could take entirely)."""
        counts = (ctypes.c_uint32 * 2)(bounded, 0)  # 0: the unbounded class as it is
        _syscall(
            SYS_IO_URING_REGISTER, self.fd, REGISTER_IOWQ_MAX_WORKERS, ctypes.addressof(counts), 2
        )

    def _map(self, size: int, offset: int) -> mmap.mmap:
        mapped = mmap.mmap(
            self.fd,
            size,
            mmap.MAP_SHARED | mmap.MAP_POPULATE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )
        self._maps.append(mapped)
        return mapped

    def push(
        self, opcode: int, fd: int, address: int, length: int, offset: int, flags: int, key: int
    ) -> bool:
        """Queue one request; False if the submission queue is full (submit first)."""
        tail = self._sq_tail.value
        if tail - self._sq_head.value >= self.sq_entries:
            return False
        SQE.pack_into(
            self._sqes,
            (tail & self._sq_mask) * SQE.size,
            opcode,
            0,
            0,
            fd,
            offset,
            address,
            length,
            flags,
            key,
        )
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF
        self.pending += 1
        return True

    def submit(self) -> None:
        """Hand the queued requests to the kernel (requests that complete at once have
        their completion in the queue on return)."""
        while self.pending:
            self.pending -= _syscall(SYS_IO_URING_ENTER, self.fd, self.pending)

    def waiting(self) -> bool:
        """Completions wait: in the queue, or as task work the kernel holds for this
        thread (TASKRUN_FLAG's mark), or overflowed."""
        return bool(
            self._cq_tail.value != self._cq_head.value
            or self._sq_flags.value & (SQ_TASKRUN | SQ_CQ_OVERFLOW)
        )

    def reap(self) -> list[tuple[int, int]]:
        """The completions waiting, as (key, result: a count or -errno), consumed; those the
        kernel holds (DEFER_TASKRUN's task work, an overflow) are posted first."""
        if self._sq_flags.value & (SQ_TASKRUN | SQ_CQ_OVERFLOW):
            _syscall(SYS_IO_URING_ENTER, self.fd, 0, 0, ENTER_GETEVENTS)
        done: list[tuple[int, int]] = []
        while True:
            head, tail = self._cq_head.value, self._cq_tail.value
            if head == tail:
                return done
            done += [
                CQE.unpack_from(self._rings, self._cqes + (index & self._cq_mask) * CQE.size)
                for index in range(head, head + ((tail - head) & 0xFFFFFFFF))
            ]
            self._cq_head.value = tail
            if self._sq_flags.value & SQ_CQ_OVERFLOW:  # room now for what overflowed
                _syscall(SYS_IO_URING_ENTER, self.fd, 0, 0, ENTER_GETEVENTS)

    def close(self) -> None:
        """Drop the rings. The kernel finishes (or cancels) what is in flight on its own;
        buffers of such requests must stay pinned, so close only with none in flight."""
        for name in ("_sq_tail", "_sq_head", "_sq_flags", "_cq_head", "_cq_tail"):
            self.__dict__.pop(name, None)
        for mapped in self._maps:
            mapped.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if getattr(self, "eventfd", -1) >= 0:
            os.close(self.eventfd)
            self.eventfd = -1
