"""The FUSE frontend: one regular file per backend, and the ``.ctl`` directory.

Backend files behave like block device nodes (docs/design.md, "FUSE"): they are served with
direct_io so no stale page of an old medium can be read after a change, O_TRUNC is ignored,
writes past the end fail with ENOSPC, and fsync flushes the whole tree. Every open file holds
a reference on its backend, so a deleted backend keeps serving the descriptors already open.

This is the only module that turns :class:`BlockError` into ``FUSEError``.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from blkfs.backend import BlockBackend, Status
from blkfs.errors import BlockError
from blkfs.frontends.ctl import REPORTS, VERBS, ControlFiles
from blkfs.frontends.fuse.compat import session_loop
from blkfs.frontends.fuse.compat.passthrough import Passthrough
from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.fuse")

CTL_NAME = ".ctl"
CTL_INODE = pyfuse3.ROOT_INODE + 1
CTL_FILE_INODES = {name: CTL_INODE + 1 + i for i, name in enumerate(VERBS + REPORTS)}
CTL_FILE_NAMES = {inode: name for name, inode in CTL_FILE_INODES.items()}
FIRST_BACKEND_INODE = 1000
BLKSIZE = 1 << 20
"""st_blksize: the I/O size cp and cat pick their buffers by; large requests are cheapest."""
ATTR_TIMEOUT = 1.0
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
SEEK_STEP = 1 << 30
"""Most one block status query of SEEK_DATA/SEEK_HOLE asks about (a qcow2 image loads the
L2 tables of what it is asked)."""
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
REFUSALS = (errno.EPERM, errno.EACCES)
"""Errors of a backend file's I/O that are a rule refusing it, not a failing disk: dd shows
only the errno, so the message goes to ``.ctl/error`` as a command's does."""
DATA_PATH = ("read", "write", "fallocate")


def fuse_handler(method: Handler) -> Handler:
    """Wrap a FUSE handler so that what it raises reaches pyfuse3 as a FUSEError
    (:meth:`BlkfsOperations.fuse_error`). read and write catch for themselves instead: a
    wrapping coroutine would cost every request of the data path a frame and a call."""

    @functools.wraps(method)
    async def wrapper(ops: BlkfsOperations, *args: Any) -> Any:
        try:
            return await method(ops, *args)
        except Exception as exc:
            raise ops.fuse_error(method.__name__, args[0], exc) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class BackendHandle:
    backend: BlockBackend
    writable: bool
    generation: int
    """The backend's media generation when it was opened (see on-change=error)."""
    dirty: bool = False
    passthrough: bool = False
    """The kernel serves its reads and writes from the host file (FUSE passthrough)."""

    def current(self) -> BlockBackend:
        """The backend, unless its medium changed since the open and it asks its users to
        open it again (ESTALE), as a reader that must never mix two media does."""
        backend = self.backend
        # the generation first: while it holds (nearly always), no call
        if backend.generation != self.generation and backend.stale(self.generation):
            raise BlockError(
                errno.ESTALE,
                f"{backend.name}: the medium changed since "
                "this file was opened (on-change=error); open it "
                "again",
            )
        return backend


@dataclass
class ControlHandle:
    name: str
    text: bytes = b""
    """For reports: the snapshot taken at open, so reads at any offset agree."""


@dataclass
class Inodes:
    """Stable inode numbers for backends, for as long as the backend object lives."""

    by_backend: dict[BlockBackend, int] = field(default_factory=dict)
    backends: dict[int, BlockBackend] = field(default_factory=dict)
    _next: Iterator[int] = field(default_factory=lambda: itertools.count(FIRST_BACKEND_INODE))

    def of(self, backend: BlockBackend) -> tuple[int, bool]:
        """The backend's inode, and whether it was just given one."""
        inode = self.by_backend.get(backend)
        if inode is not None:
            return inode, False
        inode = self.by_backend[backend] = next(self._next)
        self.backends[inode] = backend
        return inode, True

    def forget(self, backend: BlockBackend) -> None:
        inode = self.by_backend.pop(backend, None)
        if inode is not None:
            self.backends.pop(inode, None)


class BlkfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers over a BlockLayer and its ControlPlane."""

    def __init__(
        self,
        layer: BlockLayer,
        control: ControlFiles,
        allow_other: bool = False,
        poll_max_ns: int = session_loop.POLL_MAX_NS,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.control = control
        self.allow_other = allow_other
        self.poll_max_ns = poll_max_ns
        self.inodes = Inodes()
        self.handles: dict[int, BackendHandle | ControlHandle] = {}
        self.reply_buffers: dict[trio.lowlevel.Task, memoryview] = {}
        self._fh = itertools.count(1)
        self._started_ns = time.time_ns()
        self._invalidate_send, self._invalidate_recv = trio.open_memory_channel[int](1000)
        self.nursery: trio.Nursery | None = None
        """Where requests pyfuse3 does not dispatch (fallocate, lseek) run."""
        self.passthrough = Passthrough()
        self.backings: dict[BlockBackend, tuple[int, int]] = {}
        """Kernel backing id of each backend with passthrough opens, and how many."""

    def fuse_error(self, handler: str, fh: int, exc: Exception) -> pyfuse3.FUSEError:
        """What a handler raised (``fh``: its first argument, for the data path a file
        handle), as pyfuse3 answers it: a BlockError is its errno, with one log line, or for
        a rule refusing a backend file's I/O a line in ``.ctl/error`` (a user's mistake is
        no traceback); any other exception is a bug, logged with its traceback and answered
        with EIO, because an exception escaping a handler would end pyfuse3's loop."""
        if isinstance(exc, pyfuse3.FUSEError):
            return exc
        if isinstance(exc, BlockError):
            if exc.errno in REFUSALS and handler in DATA_PATH:
                self.refused(handler, fh, exc)
            else:
                log.info("%s: %s", handler, exc)
            return pyfuse3.FUSEError(exc.errno)
        log.error("%s: internal error", handler, exc_info=exc)
        return pyfuse3.FUSEError(errno.EIO)

    def spawn(self, request: Callable[[], Awaitable[None]]) -> None:
        """Run a fallocate or lseek request (see :mod:`blkfs.frontends.fuse.compat.extra_ops`)."""
        assert self.nursery is not None, "requests come only while the session runs"
        self.nursery.start_soon(request)

    def init(self) -> None:
        """The session is mounted and INIT is being answered: take requests the faster way
        from now on, and ask for passthrough in the reply."""
        session_loop.install(self.poll_max_ns)
        self.passthrough.negotiate()

    # -- change notification -------------------------------------------------------------

    def _watch(self, backend: BlockBackend) -> int:
        """The backend's inode; a backend given one is watched for changes from then on."""
        inode, new = self.inodes.of(backend)
        if new:
            backend.add_listener(self._on_change)
        return inode

    def _on_change(self, backend: BlockBackend, event: str) -> None:
        if event == "delete":  # backend entries are never cached: nothing to invalidate
            if not backend.open_count:  # no open file: the inode dies with the name
                self.inodes.forget(backend)
            return
        inode = self.inodes.by_backend.get(backend)
        if inode is not None:
            try:
                self._invalidate_send.send_nowait(inode)
            except trio.WouldBlock:
                log.warning("%s: invalidation queue full", backend.name)

    async def invalidator(self) -> None:
        """Forward cache invalidations to the kernel from outside any request handler (the
        kernel may hold locks while it waits for a reply to the request that caused them)."""
        async for inode in self._invalidate_recv:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("invalidating inode %d: %s", inode, exc)

    # -- attributes ------------------------------------------------------------------------

    def _dir_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = self._base_attr(
            inode, stat.S_IFDIR | (0o755 if inode == pyfuse3.ROOT_INODE else 0o700)
        )
        attr.st_nlink = 2
        return attr

    def _base_attr(self, inode: int, mode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = mode
        attr.st_nlink = 1
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_blksize = BLKSIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._started_ns
        attr.attr_timeout = ATTR_TIMEOUT
        attr.entry_timeout = ATTR_TIMEOUT
        return attr

    async def _backend_attr(self, backend: BlockBackend) -> pyfuse3.EntryAttributes:
        inode = self._watch(backend)
        mode = stat.S_IFREG | (0o444 if backend.read_only else 0o644)
        attr = self._base_attr(inode, mode)
        attr.st_size = backend.length()
        allocated = await backend.allocated_bytes()
        attr.st_blocks = (allocated if allocated is not None else attr.st_size) // 512
        attr.st_mtime_ns = attr.st_ctime_ns = backend.changed_ns
        # size and mode follow media changes at once, and a name deleted and created again
        # names the new backend at once (an entry invalidation would race with the next open)
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    def _ctl_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        name = CTL_FILE_NAMES[inode]
        return self._base_attr(inode, stat.S_IFREG | (0o600 if name in VERBS else 0o400))

    @fuse_handler
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode in (pyfuse3.ROOT_INODE, CTL_INODE):
            return self._dir_attr(inode)
        if inode in CTL_FILE_NAMES:
            return self._ctl_attr(inode)
        backend = self.inodes.backends.get(inode)
        if backend is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._backend_attr(backend)

    @fuse_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        text = name.decode("utf-8", "surrogateescape")
        if parent_inode == pyfuse3.ROOT_INODE:
            if text == CTL_NAME:
                return self._dir_attr(CTL_INODE)
            if text in self.layer:
                return await self._backend_attr(self.layer.find(text))
        elif parent_inode == CTL_INODE and text in CTL_FILE_INODES:
            return self._ctl_attr(CTL_FILE_INODES[text])
        raise pyfuse3.FUSEError(errno.ENOENT)

    @fuse_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        backend = self.inodes.backends.get(inode)
        if backend is None:
            if inode in CTL_FILE_NAMES and fields.update_size:
                return self._ctl_attr(inode)  # the shell's O_TRUNC on `echo > .ctl/x`
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_size and attr.st_size != backend.length():
            try:
                await backend.truncate(attr.st_size)
            except BlockError as exc:  # dd's truncate: say in .ctl/error what to do instead
                raise self.control.commands.record(f"truncate {backend.name}", exc) from None
        return await self._backend_attr(backend)

    # -- directories -----------------------------------------------------------------------

    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in (pyfuse3.ROOT_INODE, CTL_INODE):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == CTL_INODE:
            entries = [(name, self._ctl_attr(inode)) for name, inode in CTL_FILE_INODES.items()]
        else:
            entries = [(CTL_NAME, self._dir_attr(CTL_INODE))]
            for backend in self.layer:
                entries.append((backend.name, await self._backend_attr(backend)))
        for index, (name, attr) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name.encode(), attr, index):
                break

    @fuse_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """``rm MNT/NAME`` deletes the backend (never an image file)."""
        text = name.decode("utf-8", "surrogateescape")
        if parent_inode != pyfuse3.ROOT_INODE or text not in self.layer:
            raise pyfuse3.FUSEError(errno.EPERM if parent_inode == CTL_INODE else errno.ENOENT)
        await self.control.write("delete", name)

    @fuse_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        log.info(
            "refused to create '%s': backends are made with .ctl/create",
            name.decode("utf-8", "replace"),
        )
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 512
        data.f_blocks = sum(b.length() for b in self.layer) // 512
        data.f_files = len(self.layer) + len(CTL_FILE_INODES) + 2
        data.f_namemax = 128
        return data

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, handle: BackendHandle | ControlHandle) -> int:
        fh = next(self._fh)
        self.handles[fh] = handle
        return fh

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode in CTL_FILE_NAMES:
            return await self._open_control(CTL_FILE_NAMES[inode], flags)
        backend = self.inodes.backends.get(inode)
        if (
            backend is None
            or backend.name not in self.layer
            or self.layer.find(backend.name) is not backend
        ):
            raise pyfuse3.FUSEError(errno.ENOENT)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if not backend.has_medium:
            raise BlockError(errno.ENOMEDIUM, f"{backend.name}: no medium")
        if writable and backend.read_only:
            raise BlockError(errno.EROFS, f"{backend.name}: read-only medium")
        backing_id = await self._passthrough_backing(backend) if backend.passthrough else None
        backend.ref(writer=writable)  # the open file keeps the backend alive when deleted
        # O_TRUNC is ignored: a backend file is a disk, and `dd of=` must not empty it.
        handle = BackendHandle(backend, writable, backend.generation)
        fh = self._new_handle(handle)
        if backing_id is None:
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        handle.passthrough = True
        handle.dirty = writable  # its writes are not seen: its close flushes the host file
        self.passthrough.reply_open(fh, backing_id)  # the reply follows at once
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    async def _passthrough_backing(self, backend: BlockBackend) -> int | None:
        """The kernel backing id for one more passthrough open of ``backend`` (the backend
        then holds still until it is released), or None (the reason logged): the open is
        then served by blkfs as usual."""
        why = backend.passthrough_refusal() or self.passthrough.unavailable
        if why is not None:
            log.info("%s: opened without passthrough: %s", backend.name, why)
            return None
        host_fd = await backend.hold_passthrough()
        try:
            backing_id, opens = self.backings.get(backend, (0, 0))
            if not opens:
                backing_id = self.passthrough.open_backing(host_fd)
        except OSError as exc:
            backend.release_passthrough()
            log.warning(
                "%s: opened without passthrough: the kernel refused the host file: %s",
                backend.name,
                exc.strerror,
            )
            return None
        finally:
            os.close(host_fd)
        self.backings[backend] = (backing_id, opens + 1)
        return backing_id

    def _release_passthrough(self, fh: int, backend: BlockBackend) -> None:
        if self.passthrough.forget(fh):
            log.error("%s: an open reply was not made passthrough (a bug)", backend.name)
        backing_id, opens = self.backings.pop(backend)
        if opens > 1:
            self.backings[backend] = (backing_id, opens - 1)
        else:
            try:
                self.passthrough.close_backing(backing_id)
            except OSError as exc:
                log.warning("%s: closing backing id %d: %s", backend.name, backing_id, exc)
        backend.release_passthrough()

    async def _open_control(self, name: str, flags: int) -> pyfuse3.FileInfo:
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if (name in VERBS) != writing and not (name in VERBS and flags & os.O_ACCMODE == os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EACCES if name in REPORTS else errno.EINVAL)
        handle = ControlHandle(name)
        if name in REPORTS:
            handle.text = (await self.control.read(name)).encode()
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True, nonseekable=False)

    async def read(  # type: ignore[override]  # pyfuse3 replies with any buffer
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        try:
            handle = self.handles[fh]
            if isinstance(handle, ControlHandle):
                return handle.text[off : off + size]
            backend = handle.current()
            end = off + size
            length = backend.length()
            if end > length:  # not min(): a slow call
                end = length
            if off >= end:
                if not backend.has_medium:
                    raise BlockError(errno.ENOMEDIUM, f"{backend.name}: no medium")
                return b""
            buf = self._reply_buffer(end - off)
            await backend.readinto(off, buf)
            return buf
        except Exception as exc:
            raise self.fuse_error("read", fh, exc) from None

    def _reply_buffer(self, size: int) -> memoryview:
        """A buffer for a read reply, one per pyfuse3 worker task and reused by it: pyfuse3
        sends the reply before that worker takes its next request, so the buffer is free
        again by then, and a new buffer's zero-fill (7% of a 1 MiB read) is saved."""
        task = trio.lowlevel.current_task()
        buf = self.reply_buffers.get(task)
        if buf is None or buf.nbytes < size:
            buf = self.reply_buffers[task] = memoryview(bytearray(size))
        return buf if buf.nbytes == size else buf[:size]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            handle = self.handles[fh]
            if isinstance(handle, ControlHandle):
                await self.control.write(handle.name, buf)
                return len(buf)
            backend = handle.current()
            length = backend.length()
            data = memoryview(buf)
            if off < length < off + len(buf):  # a disk takes what fits, then says ENOSPC
                data = data[: length - off]
            await backend.write(off, data)
            handle.dirty = True
            return data.nbytes
        except Exception as exc:
            raise self.fuse_error("write", fh, exc) from None

    def refused(self, what: str, fh: int, exc: BlockError) -> None:
        """Keep the reason a backend file's I/O was refused for ``.ctl/error`` and the log
        (a ``.ctl`` file's command has kept its own)."""
        handle = self.handles.get(fh)
        if isinstance(handle, BackendHandle):
            self.control.commands.record(f"{what} {handle.backend.name}", exc)
        else:
            log.info("%s: %s", what, exc)

    def _backend_handle(self, fh: int) -> BackendHandle:
        handle = self.handles.get(fh)
        if not isinstance(handle, BackendHandle):
            raise pyfuse3.FUSEError(errno.EINVAL)
        handle.current()
        return handle

    @fuse_handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2), as a loop device sends it for discard (fstrim, blkdiscard: a punched
        hole) and write-zeroes (blkdiscard -z, mkfs: a zeroed range). Both read as zeros
        afterwards, so both are write_zeroes; a punched hole may unmap, which gives the space
        back (freed qcow2 clusters, holes in a raw file). Allocating is a no-op on a thin
        disk; past the end, without KEEP_SIZE, it grows a resizable medium as truncate does."""
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        handle = self._backend_handle(fh)
        backend = handle.backend
        end = offset + length
        if end > backend.length():
            if mode & FALLOC_FL_KEEP_SIZE:
                end = backend.length()
            else:
                await backend.truncate(end)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) and offset < end:
            await backend.write_zeroes(
                offset, end - offset, unmap=bool(mode & FALLOC_FL_PUNCH_HOLE)
            )
            handle.dirty = True

    @fuse_handler
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE from the medium's block status, so cp --sparse, tar -S
        and qemu-img convert skip what reads as zeros without holding data."""
        backend = self._backend_handle(fh).backend
        size = backend.length()
        if offset >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        want_data = whence == os.SEEK_DATA
        position = offset
        while position < size:
            extent = await backend.block_status(position, min(size - position, SEEK_STEP))
            if (Status.DATA in extent.status) == want_data:
                return position
            position += extent.length
        if want_data:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return size  # the end of a file is a hole

    @fuse_handler
    async def flush(self, fh: int) -> None:
        """close(): a written backend file is flushed to the host, as a block device is on
        its last close, so that data is safe once the writer's close returns."""
        handle = self.handles.get(fh)
        if (
            isinstance(handle, BackendHandle)
            and handle.dirty
            and handle.backend.has_medium
            and not handle.backend.stale(handle.generation)
        ):  # a change flushed it
            await handle.backend.flush()
            handle.dirty = False

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, BackendHandle):
            await handle.current().flush()
            handle.dirty = False

    @fuse_handler
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if isinstance(handle, BackendHandle):
            if handle.passthrough:
                self._release_passthrough(fh, handle.backend)
            await handle.backend.unref(writer=handle.writable)
            if handle.backend.refcnt == 0:
                self.inodes.forget(handle.backend)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inode numbers stay valid while the backend lives; nothing to free here."""

    async def release_all(self) -> None:
        """On shutdown: drop every reference open files hold, so backends can close."""
        for fh in list(self.handles):
            await self.release(fh)
