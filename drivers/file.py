"""``file``: the protocol driver for a host file or block device.

Nothing that can block runs in the event loop (README, "What runs where"): one slow or hung
device must not stall the other backends, the control files, QMP or NBD. A read first asks
the page cache without waiting (``preadv`` with ``RWF_NOWAIT``): a hit is served inline, on the
caller's buffer, as cheap as before; a miss (``EAGAIN``, or a short read), any read of a
``cache.direct=on`` node, and a read of a host filesystem that cannot answer ``RWF_NOWAIT``
(tmpfs, FUSE) leave the loop, as do writes, fallocate (discard, write_zeroes), lseek
(block_status), ftruncate and fdatasync. Buffered writes are not tried with ``RWF_NOWAIT``:
ext4 refuses that (EOPNOTSUPP, kernel 6.18), so they always leave it.

How a host call leaves the loop is QEMU's ``aio`` option. ``aio=io_uring``, the default
where the system allows io_uring (:class:`blkfs.block.workers.RingDoor`): reads, writes and
fdatasync go to the kernel's io_uring with no thread of ours. The kernel tries each one
without blocking first; a read that misses the page cache completes by task work in the
loop's own thread (DEFER_TASKRUN: the loop's eventfd wakes, and nothing else does), so a
miss costs about what an inline blocking read did; a call that must block (an ext4 buffered
write: ext4 does not write buffered without blocking, kernel 6.18; fdatasync) runs on the
kernel's io-wq workers, which need no GIL. Measured against ``aio=threads`` through the
mount, interleaved (docs/benchmarks.md, 2026-12-07): cold 4 KiB QD1 reads 1.4-2.1x (0.70
of inline reads, threads 0.48), cold 4-job reads 1.6-1.8x, random writes the same
(0.85-1.08x: both pay two wake-ups of idle vCPUs, a quarter to a third of inline writes),
warm reads the same path (inline).
``aio=threads`` (the fallback, and QEMU's default) runs them on
:mod:`blkfs.block.workers`' threads: shared by all nodes, completions batched through one
eventfd (21 us a round trip against 60 us for ``trio.to_thread.run_sync``). Either way at
most :data:`WORKERS_PER_NODE` calls of one node run at once, and fallocate (discard,
write_zeroes), lseek (block_status) and ftruncate always go to the threads; so do all calls
of a ``cache.direct=on`` node (its bounce buffers). ``aio=native`` is refused, not
implemented. fstat (length, allocated bytes) stays inline: it reads the inode, which every
getattr of a backend file asks for.

Discard and write_zeroes punch holes where the host filesystem can; block_status asks the
host with SEEK_DATA/SEEK_HOLE so sparse images copy sparsely.

``cache.direct=on`` (QEMU's option, its cache=none) bypasses the host page cache with
O_DIRECT, through a buffer aligned in memory; offsets and lengths are aligned to the
device's logical block size (a file: its filesystem's block size, at most a page), which
the layer read-modify-writes around.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from blkfs.block import (
    REQUIRED,
    BlockDriver,
    BlockError,
    Extent,
    LastingError,
    Node,
    Option,
    OptionError,
    Perm,
    RangeLocks,
    Status,
    WriteFlags,
)
from blkfs.block.request import align_up
from blkfs.block.workers import HostCall, HostQueue, RingDoor, ring_door
from blkfs.errors import from_oserror

from .image_lock import ImageLocks, LockConflict, LocksUnsupported

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2), which the os module lacks; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


T = TypeVar("T")

RWF_NOWAIT = os.RWF_NOWAIT
RWF_DSYNC = os.RWF_DSYNC
WORKERS_PER_NODE = 16
"""Host calls of one node that run at once (QEMU's thread pool has 64 for all its nodes):
a device that stops answering holds at most this many worker threads."""

BLKSSZGET = 0x1268
"""ioctl: a block device's logical block size."""
BOUNCE_SIZE = 1 << 20
"""Aligned buffers of cache.direct=on are this large; longer requests go in pieces."""
BOUNCE_KEPT = 8


def direct_alignment(fd: int) -> int:
    """The offset and length alignment O_DIRECT needs on ``fd``: a block device's logical
    block size; for a file, its filesystem's block size, at most a page (which every
    device's logical block size divides). Not found by trying reads, as QEMU's
    raw_probe_alignment also does: a read of a hole or at the end of a file succeeds
    unaligned, and a 4 KiB-sector disk would then be taken for a 512-byte one."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size: int = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0]
        return size
    return max(512, min(st.st_blksize, mmap.PAGESIZE))


def pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; past the end of the file, zeros."""
    done = os.preadv(fd, [buf], offset)
    while done < buf.nbytes:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            buf[done:] = bytes(buf.nbytes - done)
            return
        done += got


def pread_direct(fd: int, buf: memoryview, offset: int, align: int) -> None:
    """O_DIRECT reads of all of ``buf`` (aligned in memory, offset and length by ``align``).
    A short read that stops on an alignment boundary is read on from (network filesystems
    return them in the middle of a file); one that returns nothing or stops unaligned is the
    end of the file, and the rest reads as zeros (reading on from an unaligned end would
    fail)."""
    done = 0
    while done < buf.nbytes:
        got = os.preadv(fd, [buf[done:]], offset + done)
        done += got
        if not got or done % align:
            break
    buf[done:] = bytes(buf.nbytes - done)


def pwrite_full(fd: int, data: memoryview, offset: int, flags: int = 0) -> None:
    done = os.pwritev(fd, [data], offset, flags)
    while done < data.nbytes:
        done += os.pwritev(fd, [data[done:]], offset + done, flags)


def copy_file_range_full(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy all ``length`` bytes; past the end of the source file, zeros (as a read)."""
    done = 0
    while done < length:
        got = os.copy_file_range(src, dst, length - done, src_offset + done, dst_offset + done)
        if got == 0:
            pwrite_full(dst, memoryview(bytes(length - done)), dst_offset + done)
            return
        done += got


class FileDriver(BlockDriver):
    name = "file"
    growable = True
    supported_write_flags = WriteFlags.FUA | WriteFlags.NO_FALLBACK
    options = {
        "filename": Option("str", REQUIRED, "path of the host image file"),
        "locking": Option(
            "enum",
            "auto",
            "QEMU-compatible image locking (auto: where the host filesystem supports it)",
            choices=("auto", "on", "off"),
        ),
        "cache.direct": Option(
            "bool",
            False,
            "bypass the host page cache (O_DIRECT), as "
            "QEMU's cache.direct; requests are aligned to the file's "
            "logical block size",
        ),
        "aio": Option(
            "enum",
            None,
            "how host calls that may block leave the event loop, as QEMU's aio: "
            "io_uring or threads (default: io_uring where the system allows it, else "
            "threads; native is not implemented)",
            choices=("threads", "io_uring", "native"),
        ),
    }

    fd = -1
    _is_block_device = False
    _can_punch = True
    direct = False
    _bounce: list[mmap.mmap]
    flush_error: str | None = None
    _can_copy = True
    """The host copies between this file and others (copy_file_range; not across
    filesystems of different kinds)."""
    _nowait_reads = True
    """The host filesystem answers RWF_NOWAIT reads (not tmpfs, not FUSE)."""

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.filename = values["filename"]
        self.ring = self._ring(values["aio"])
        self.host = HostQueue(WORKERS_PER_NODE)
        self._changing = RangeLocks()
        """Ranges a worker reads or changes: two host calls on one range never overlap, as
        when every call ran in the loop (a read racing a write could return half of each)."""
        self.use_locks = values["locking"] != "off"
        self.locks = ImageLocks()
        self.fd = await self.node.open_host_file(self.filename, writable=not values["read-only"])
        st = os.fstat(self.fd)
        self._is_block_device = stat.S_ISBLK(st.st_mode)
        self.discard_granularity = st.st_blksize  # the host's unit of hole punching
        self.direct = values["cache.direct"]
        self._bounce: list[mmap.mmap] = []
        if self.direct:
            try:
                self._set_direct(self.fd)
                self.request_alignment = direct_alignment(self.fd)
            except BaseException:
                self.node.close_host_file(self.fd)
                self.fd = -1
                raise
        if self.ring is not None:
            self.ring.attach()

    def _ring(self, aio: str | None) -> RingDoor | None:
        """The io_uring of aio=io_uring (and of no aio, where the system allows it), None
        for threads; an error if aio=io_uring cannot be had."""
        if aio == "threads":
            return None
        if aio == "native":
            raise OptionError(
                f"'{self.filename}': aio=native is not implemented; use aio=io_uring or aio=threads"
            )
        try:
            return ring_door(WORKERS_PER_NODE)
        except OSError as exc:
            if aio is None:
                return None
            raise OptionError(
                f"'{self.filename}': aio=io_uring, but this system refuses io_uring "
                f"({exc.strerror}: kernel.io_uring_disabled, a seccomp filter or an old "
                "kernel); use aio=threads"
            ) from None

    def _set_direct(self, fd: int) -> None:
        """O_DIRECT on ``fd``, or EINVAL saying the host filesystem cannot."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as exc:
            raise BlockError(
                errno.EINVAL,
                f"'{self.filename}': cache.direct=on, but the host "
                "filesystem cannot bypass its page cache (O_DIRECT: "
                f"{exc.strerror})",
            ) from None

    @classmethod
    def same_node(cls, values: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
        """The same host file, however it is named, with the same options."""
        try:
            same_file = os.path.samefile(values["filename"], wanted["filename"])
        except OSError:
            return False
        return same_file and super().same_node(
            {**values, "filename": ""}, {**wanted, "filename": ""}
        )

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """Only read-only may change: a new descriptor with the new access mode and the same
        locks replaces the old one, which keeps working if the new one cannot be had."""
        await super().reopen(values)
        if values["read-only"] != self.node.read_only:
            fd = self.node.reopen_host_file(self.filename, writable=not values["read-only"])
            try:
                if self.direct:
                    self._set_direct(fd)
                old, new = os.fstat(self.fd), os.fstat(fd)
                if (old.st_dev, old.st_ino) != (new.st_dev, new.st_ino):
                    raise BlockError(
                        errno.EBUSY,
                        f"'{self.filename}' now names another "
                        "file; change the medium to use that one",
                    )
                self.locks.copy_to(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(self.fd)
            self.fd = fd

    # -- QEMU's image locks, following the node's permissions ------------------------------

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if not self.use_locks:
            return
        try:
            self.locks.prepare(self.fd, perm, shared)
        except LockConflict as exc:
            raise BlockError(
                errno.EBUSY,
                f"'{self.filename}' is in use by another program "
                f"or node ({exc}; QEMU-compatible image locking)",
            ) from None
        except LocksUnsupported as exc:
            if self.node.values["locking"] == "on":
                raise BlockError(
                    errno.ENOTSUP,
                    f"'{self.filename}': locking=on, but the host filesystem cannot lock ({exc})",
                ) from None
            self.use_locks = False  # auto: where the host can

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self.use_locks:
            self.locks.commit(self.fd, perm, shared)

    def abort_perm(self) -> None:
        if self.use_locks:
            self.locks.abort(self.fd)

    async def close(self) -> None:
        """Close the file, or, while calls that were let go are still on workers, once they
        return: until then the descriptor (and so its image locks) stays, and nothing
        reopens the image for writing behind them."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            if self.host.calls:
                self.node.hold_host_file(
                    f"{len(self.host.calls)} host call(s) of node '{self.node.name}'"
                )
            self.host.when_returned(lambda: self._close(fd))

    def _close(self, fd: int) -> None:
        self.node.close_host_file(fd)
        if self.ring is not None:
            self.ring.detach()
        for bounce in self._bounce:
            bounce.close()
        self._bounce.clear()

    def let_go(self, error: BlockError) -> int:
        message = f"'{self.filename}': {error.message}"
        return self.host.let_go(lambda: LastingError(error.errno, message))

    def _error(self, exc: OSError) -> BlockError:
        return from_oserror(exc, f"'{self.filename}'")

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on a worker thread; an OSError becomes this file's BlockError."""
        try:
            return await self.host.run(call, *args)
        except OSError as exc:
            raise self._error(exc) from None

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """From the page cache (``RWF_NOWAIT``), if it has it all and no change of the range
        is on a worker."""
        if not self._nowait_reads or self.direct or self._changing.busy(offset, buf.nbytes):
            return False
        try:
            return os.preadv(self.fd, [buf], offset, RWF_NOWAIT) == buf.nbytes
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise self._error(exc) from None
            self._nowait_reads = False
            return False

    async def read(self, offset: int, buf: memoryview) -> None:
        """Inline if :meth:`read_now` can, else on a worker, whole: a read is never half
        before and half after a write."""
        if self.read_now(offset, buf):
            return
        async with self._changing.hold(offset, buf.nbytes):
            if self.direct:
                await self._blocking(self._read_direct, offset, buf)
            elif self.ring is not None:
                await self._read_ring(self.ring, offset, buf)
            else:
                await self._blocking(pread_full, self.fd, buf, offset)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """With FUA, a buffered write is made with ``RWF_DSYNC`` (durable in the one call,
        as O_DSYNC would make it); a cache.direct=on one is followed by a flush."""
        fua = bool(flags) and bool(flags & WriteFlags.FUA)  # no Flag arithmetic without flags
        dsync = RWF_DSYNC if fua and not self.direct else 0
        try:
            async with self._changing.hold(offset, data.nbytes):
                if self.direct:
                    await self._blocking(self._write_direct, offset, data)
                elif self.ring is not None:
                    done = 0
                    while done < data.nbytes:
                        done += await self._in_ring(
                            self.ring.write(self.fd, data[done:], offset + done, dsync)
                        )
                else:
                    await self._blocking(pwrite_full, self.fd, data, offset, dsync)
        except BlockError as exc:
            if dsync and exc.errno == errno.EIO:
                raise self._flush_failed(exc) from None
            raise
        if fua and self.direct:
            await self.flush()

    async def copy_from(self, offset: int, source: Node, source_offset: int, length: int) -> bool:
        """``copy_file_range`` from another host file, on a worker, with both ranges held as
        a read and a write are; False if either file bypasses the page cache (its requests
        are aligned through a bounce buffer) or the host cannot (another filesystem)."""
        if not self.copies_from(source):
            return False
        host = source.driver
        assert isinstance(host, FileDriver)
        async with (
            host._changing.hold(source_offset, length),
            self._changing.hold(offset, length),
        ):
            try:
                await self.host.run(
                    copy_file_range_full, host.fd, source_offset, self.fd, offset, length
                )
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise self._error(exc) from None
                self._can_copy = False
                return False
        return True

    def copies_from(self, source: Node) -> bool:
        host = source.driver
        return isinstance(host, FileDriver) and self._can_copy and not (self.direct or host.direct)

    async def _in_ring(self, begin: Callable[[HostCall], None]) -> int:
        """One io_uring request; an OSError becomes this file's BlockError."""
        try:
            done: int = await self.host.start(begin)
        except OSError as exc:
            raise self._error(exc) from None
        return done

    async def _read_ring(self, ring: RingDoor, offset: int, buf: memoryview) -> None:
        """:func:`pread_full` through the ring."""
        done = 0
        while done < buf.nbytes:
            got = await self._in_ring(ring.read(self.fd, buf[done:], offset + done))
            if got == 0:
                buf[done:] = bytes(buf.nbytes - done)
                return
            done += got

    # -- cache.direct=on -------------------------------------------------------------------

    @contextmanager
    def _aligned(self) -> Iterator[memoryview]:
        """A buffer of BOUNCE_SIZE bytes aligned in memory (mmap's pages), kept for reuse."""
        try:
            bounce = self._bounce.pop()  # on a worker thread: no check-then-pop race
        except IndexError:
            bounce = mmap.mmap(-1, BOUNCE_SIZE)
        view = memoryview(bounce)
        try:
            yield view
        finally:
            view.release()
            if len(self._bounce) < BOUNCE_KEPT:
                self._bounce.append(bounce)
            else:
                bounce.close()

    def _read_direct(self, offset: int, buf: memoryview) -> None:
        """Aligned pieces into an aligned buffer, copied out. The layer aligns requests,
        except one that ends at the end of the file, read rounded up."""
        align = self.request_alignment
        with self._aligned() as bounce:
            position, end = offset, offset + buf.nbytes
            while position < end:
                start = position - position % align
                stop = min(end, start + BOUNCE_SIZE)
                length = align_up(stop - start, align)
                pread_direct(self.fd, bounce[:length], start, align)
                buf[position - offset : stop - offset] = bounce[position - start : stop - start]
                position = stop

    def _write_direct(self, offset: int, data: memoryview) -> None:
        """Copied into an aligned buffer and written. The layer hands whole aligned blocks,
        except a last one that ends the file: that one is padded with zeros to a block and
        the file cut back to its end."""
        align = self.request_alignment
        end = offset + data.nbytes
        with self._aligned() as bounce:
            position = offset
            while position < end:
                stop = min(end, position + BOUNCE_SIZE)
                length = align_up(stop - position, align)
                bounce[: stop - position] = data[position - offset : stop - offset]
                bounce[stop - position : length] = bytes(length - (stop - position))
                size = os.lseek(self.fd, 0, os.SEEK_END) if length > stop - position else None
                if size is not None and size > stop:  # the padding would overwrite data
                    raise BlockError(
                        errno.EINVAL,
                        f"'{self.filename}': unaligned write at "
                        f"{position}+{stop - position} inside the "
                        "file (cache.direct=on)",
                    )
                pwrite_full(self.fd, bounce[:length], position)
                if size is not None:
                    os.ftruncate(self.fd, stop)
                position = stop

    async def flush(self) -> None:
        """fdatasync; a failure stays: Linux reports a failed writeback once, marks the
        pages clean and lets the next fdatasync succeed ("fsyncgate"), so what was written
        before it may be lost whatever a retry says. As QEMU's file-posix (and PostgreSQL)
        do, every later flush fails until the image is opened again (a media change)."""
        if self.flush_error is not None:
            raise LastingError(
                errno.EIO,
                f"'{self.filename}': an earlier flush failed "
                f"({self.flush_error}); what was written before it "
                "may be lost, so no flush succeeds until the medium "
                "is changed (or ejected and inserted)",
            )
        try:
            if self.ring is not None:
                await self.host.start(self.ring.fdatasync(self.fd))
            else:
                await self.host.run(os.fdatasync, self.fd)
        except OSError as exc:
            raise self._flush_failed(self._error(exc)) from None

    def _flush_failed(self, failed: BlockError) -> LastingError:
        """A failed fdatasync, or a failed ``RWF_DSYNC`` write (whose writeback error the
        kernel reports there, and to no later fdatasync): every later flush fails too."""
        self.flush_error = os.strerror(failed.errno)
        return LastingError(failed.errno, failed.message)

    def reusable(self) -> bool:
        return self.flush_error is None

    async def discard(self, offset: int, length: int) -> None:
        if self._can_punch and not self._is_block_device:
            try:
                async with self._changing.hold(offset, length):
                    await self.host.run(
                        fallocate,
                        self.fd,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        offset,
                        length,
                    )
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise self._error(exc) from None
                self._can_punch = False

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """fallocate (a hole with ``unmap``, else zeroed extents), then a flush for FUA;
        where the host cannot, zeros written, or ENOTSUP for NO_FALLBACK."""
        if not self._is_block_device:
            mode = (FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE
            try:
                async with self._changing.hold(offset, length):
                    await self.host.run(fallocate, self.fd, mode, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise self._error(exc) from None
            else:
                if flags & WriteFlags.FUA:
                    await self.flush()
                return
        if flags & WriteFlags.NO_FALLBACK:
            raise BlockError(
                errno.ENOTSUP, f"'{self.filename}': the host cannot zero without writing zeros"
            )
        await super().write_zeroes(offset, length, unmap, flags)

    async def length(self) -> int:
        if self._is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    async def truncate(self, length: int) -> None:
        if self._is_block_device:
            raise BlockError(errno.ENOTSUP, f"'{self.filename}' is a block device")
        await self._blocking(os.ftruncate, self.fd, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        if self._is_block_device:
            return await super().block_status(offset, length)
        try:
            data = await self.host.run(os.lseek, self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end
                return Extent(length, Status.ZERO | Status.ALLOCATED)
            return await super().block_status(offset, length)
        if data > offset:
            return Extent(min(data - offset, length), Status.ZERO | Status.ALLOCATED)
        hole = await self._blocking(os.lseek, self.fd, offset, os.SEEK_HOLE)
        return Extent(min(hole - offset, length), Status.DATA | Status.ALLOCATED)

    async def allocated_bytes(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512

    def info(self) -> dict[str, Any]:
        return {"filename": self.filename}

    def host_call_ns(self) -> int | None:
        return self.host.oldest_ns()
