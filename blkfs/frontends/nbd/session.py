"""One NBD client: its handshake, then its requests, many in flight, over the backend API.

Ground rules: a request is checked against what was negotiated
(:func:`blkfs.nbd.check_request`) before it reaches the backend, which checks it again as it
checks every frontend's. Every request gets a reply; one that failed says why in its error
chunk (errors NBD has no value for, such as ENOMEDIUM or ESTALE, are EIO on the wire, named
in the message). A client that breaks the protocol is hung up on; what it has in flight
still finishes, so a backend never sees a request cut off halfway. Requests run as tasks of
the session, bounded in number and in bytes held (:class:`Budget`), so no client makes the
daemon buffer without bound. The session holds a reference on its backend (a writer's, for
a writable export) from NBD_OPT_GO until the client leaves, as an open file does.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import time

import trio

from blkfs.backend import BlockBackend, Status
from blkfs.errors import BlockError
from blkfs.frontends.nbd.export import Export, Listener, Unauthorized
from blkfs.info import ClientStatus
from blkfs.nbd import (
    BASE_ALLOCATION,
    DIRTY_BITMAP,
    REQUEST,
    STATE_DIRTY,
    Catalog,
    Cmd,
    CmdFlag,
    Negotiated,
    ProtocolError,
    ReceiveBuffer,
    Request,
    ServerHandshake,
    State,
    TransmissionFlag,
    block_status,
    check_request,
    error_chunk,
    merge_extents,
    none_chunk,
    offset_data,
    offset_hole,
    parse_request,
    simple_reply,
    to_nbd_errno,
    unsent,
)
from blkfs.nbd.authz import allowed, distinguished_name

log = logging.getLogger("blkfs.nbd")

HANDSHAKE_TIMEOUT = 10.0
"""A client has this long to choose an export (qemu-nbd's handshake-max-seconds)."""
MAX_IN_FLIGHT = 64
"""Requests one client may have in flight; the next waits (the socket backs up)."""
SESSION_BYTES = 64 << 20
"""Request buffers one client may hold at once: two of the largest requests."""
SPARSE_READ_MIN = 64 << 10
"""Reads at least this long send what reads as zeros as holes (a block status first);
shorter ones are cheaper read whole."""
MAX_SEGMENTS = 64
"""Most holes and data runs one read is split into; the rest is sent as data."""
MAX_DESCRIPTORS = 1024
"""Most block status descriptors one reply carries (clients ask again for the rest)."""
DISCONNECTED = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)
KINDS = {int(command): command.name.lower() for command in Cmd}
"""Requests by kind, as the export's counters name them."""
FUA, NO_HOLE, FAST_ZERO, DF, REQ_ONE = (
    int(flag)
    for flag in (CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.FAST_ZERO, CmdFlag.DF, CmdFlag.REQ_ONE)
)
"""Command flags as plain ints: enum arithmetic costs microseconds a request."""


class Budget:
    """Bytes of request buffers that may be held at once; a request waits for its share,
    so a flood of large requests is slowed, never buffered without bound."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total
        self._freed = trio.Event()

    async def take(self, nbytes: int) -> int:
        """Wait for ``nbytes`` (at most the whole budget); returns what was taken."""
        nbytes = min(nbytes, self.total)
        while self.free < nbytes:
            await self._freed.wait()
        self.free -= nbytes
        return nbytes

    def give(self, nbytes: int) -> None:
        self.free += nbytes
        self._freed.set()
        self._freed = trio.Event()


def nbd_state(status: Status) -> int:
    """``base:allocation`` flags of a block status: a hole is what holds no data, as
    QEMU's server reports it, so that ``nbdinfo --map`` agrees with ``qemu-img map``."""
    return (0 if Status.DATA in status else State.HOLE) | (
        State.ZERO if Status.ZERO in status else 0
    )


class Session:
    """One client connection, from its handshake to its last reply."""

    def __init__(self, stream: trio.SocketStream, listener: Listener, budget: Budget) -> None:
        self.stream = stream
        self.listener = listener
        self.budget = budget
        self.peer = _peer(stream)
        self.since = time.time()
        self.export: Export | None = None
        self.negotiated: Negotiated | None = None
        self.generation = 0
        self.in_flight = 0
        self.finished = trio.Event()
        self.tls: trio.SSLStream[trio.SocketStream] | None = None
        """The TLS stream over ``stream``, once NBD_OPT_STARTTLS has succeeded."""
        self._rx = ReceiveBuffer()
        self._reader = trio.CancelScope()
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._mine = Budget(SESSION_BYTES)

    def status(self) -> ClientStatus:
        return {
            "peer": self.peer,
            "since": int(self.since),
            "in-flight": self.in_flight,
            "tls": self.tls is not None,
        }

    def stop(self) -> None:
        """Take no more requests; those in flight are answered, then the client is let go."""
        self._reader.cancel()

    def hung_up(self) -> bool:
        """True once the client has closed its end, even if this session has not read that yet
        (a script's ``nbdcopy`` has exited: its export is not in use any more)."""
        fd = self.stream.socket.fileno()
        if fd < 0:  # closed here already: the session is on its way out
            return True
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        return bool(poller.poll(0))

    async def run(self) -> None:
        self.listener.sessions.add(self)
        try:
            async with trio.open_nursery() as handlers:
                try:
                    with self._reader:
                        if await self._negotiate():
                            await self._receive(handlers)
                except (ProtocolError, *DISCONNECTED) as exc:
                    log.info(
                        "nbd: %s on %s: %s",
                        self.peer,
                        self.listener.address,
                        str(exc) or type(exc).__name__,
                    )
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
                await self._detach()
            self.listener.sessions.discard(self)
            self.finished.set()

    # -- handshake -----------------------------------------------------------------------

    async def _negotiate(self) -> bool:
        """Agree on an export; False if the client left or took too long."""
        context = self.listener.tls_context
        handshake = ServerHandshake(self.listener, (BASE_ALLOCATION,), tls=context is not None)
        await self._send(handshake.greeting())
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
            while not handshake.done:
                reply = handshake.receive(await self._exactly(handshake.want()))
                if handshake.result is not None:
                    self._attach(handshake.result)  # before the client hears it may start
                await self._send(reply)
                if handshake.upgrade:
                    assert context is not None
                    await self._start_tls(context)
                    handshake.secured()
                    handshake.catalog = self._authorized()
        if timer.cancelled_caught:
            log.info(
                "nbd: %s on %s: no export chosen within %gs",
                self.peer,
                self.listener.address,
                HANDSHAKE_TIMEOUT,
            )
        return self.export is not None

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        """The TLS handshake NBD_OPT_STARTTLS agreed to; a client that sent more before it
        is hung up on (what it sent cannot be trusted to belong to either side of TLS)."""
        if len(self._rx):
            raise ProtocolError("data after NBD_OPT_STARTTLS, before the TLS handshake")
        self.tls = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await self.tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise ProtocolError(f"TLS handshake failed: {exc.__cause__ or exc}") from None

    def _authorized(self) -> Catalog:
        """What the client may choose from, now that its certificate (if the listener
        checks them) is verified: the listener's exports, or nothing if a tls-authz file
        is given and none of its lines matches the certificate's distinguished name."""
        patterns = self.listener.tls_allowed
        if patterns is None:
            return self.listener
        assert self.tls is not None
        certificate = self.tls.getpeercert()  # verified: the context requires one
        assert certificate is not None
        name = distinguished_name(certificate["subject"])
        if allowed(patterns, name):
            log.info(
                "nbd: %s on %s: client certificate '%s'", self.peer, self.listener.address, name
            )
            return self.listener
        return Unauthorized(self.listener, self.peer, name)

    def _attach(self, negotiated: Negotiated) -> None:
        export = self.listener.exports[negotiated.export.name]
        writer = not negotiated.export.flags & TransmissionFlag.READ_ONLY
        export.backend.ref(writer=writer)
        self.export, self.negotiated = export, negotiated
        self.generation = export.backend.generation
        export.sessions.add(self)
        export.stats.connections += 1
        log.info(
            "nbd: %s connected to export '%s' (backend %s%s)",
            self.peer,
            export.name,
            export.backend.name,
            ", writable" if writer else "",
        )

    async def _detach(self) -> None:
        export, negotiated = self.export, self.negotiated
        if export is None or negotiated is None:
            return
        export.sessions.discard(self)
        writer = not negotiated.export.flags & TransmissionFlag.READ_ONLY
        try:
            await export.backend.unref(writer=writer)
        except BlockError as exc:  # the last reference of a deleted backend: its flush
            log.error(
                "%s: closed, but the final flush failed: %s", export.backend.name, exc.message
            )
        log.info("nbd: %s left export '%s'", self.peer, export.name)

    # -- requests ------------------------------------------------------------------------

    async def _receive(self, handlers: trio.Nursery) -> None:
        assert self.negotiated is not None
        while True:
            request = parse_request(await self._exactly(REQUEST.size))
            if request.type == Cmd.DISC:
                return
            refusal = check_request(request, self.negotiated)
            if refusal is not None and request.payload:
                await self._skip(request.payload)
            wanted = (
                request.length if refusal is None and request.type in (Cmd.READ, Cmd.WRITE) else 0
            )
            await self._slots.acquire()
            held = await self._mine.take(wanted), await self.budget.take(wanted)
            try:
                data = None
                if refusal is None and request.payload:
                    data = memoryview(bytearray(request.payload))
                    await self._fill(data)
            except BaseException:
                self._release(held)
                raise
            self.in_flight += 1
            handlers.start_soon(self._handle, request, data, refusal, held)

    def _release(self, held: tuple[int, int]) -> None:
        self._mine.give(held[0])
        self.budget.give(held[1])
        self._slots.release()

    async def _handle(
        self,
        request: Request,
        data: memoryview | None,
        refusal: tuple[int, str] | None,
        held: tuple[int, int],
    ) -> None:
        assert self.export is not None
        kind = KINDS.get(request.type, "unknown")
        try:
            if refusal is not None:
                raise _Refusal(*refusal)
            await self._execute(request, data)
        except _Refusal as exc:
            self.export.stats.errors += 1
            await self._reply_error(request, exc.error, exc.message)
        except BlockError as exc:
            self.export.stats.errors += 1
            await self._reply_error(
                request,
                to_nbd_errno(exc.errno),
                f"{exc.message} [{errno.errorcode.get(exc.errno, '?')}]",
            )
        except DISCONNECTED:
            self.stop()  # the client is gone: its other replies have nowhere to go
        except Exception:  # a bug: the client gets EIO, the daemon lives
            log.exception("nbd: %s: %s failed", self.peer, kind)
            self.export.stats.errors += 1
            await self._reply_error(request, to_nbd_errno(errno.EIO), "internal error")
        finally:
            self.in_flight -= 1
            self._release(held)

    async def _execute(self, request: Request, data: memoryview | None) -> None:
        assert self.export is not None and self.negotiated is not None
        backend = self._backend()
        kind, flags = request.type, request.flags
        offset, length = request.offset, request.length
        fua = bool(flags & FUA)
        if kind == Cmd.READ:
            await self._read(backend, request)
            return
        if kind == Cmd.BLOCK_STATUS:
            await self._block_status(backend, request)
            return
        if kind == Cmd.WRITE:
            assert data is not None
            await backend.write(offset, data, fua=fua)
        elif kind == Cmd.FLUSH:
            await backend.flush()
        elif kind == Cmd.TRIM:
            await backend.discard(offset, length)
        elif kind == Cmd.WRITE_ZEROES:
            await backend.write_zeroes(
                offset,
                length,
                unmap=not flags & NO_HOLE,
                fua=fua,
                fast=bool(flags & FAST_ZERO),
            )
        if fua and kind == Cmd.TRIM:
            await backend.flush()
        self._count(request)
        await self._send(simple_reply(request.cookie))

    def _count(self, request: Request) -> None:
        """A request succeeded: counted before its last reply goes, so that a client that
        has its reply finds it in the status."""
        assert self.export is not None
        kind = KINDS[request.type]
        self.export.stats.count(kind, request.length if kind in ("read", "write") else 0)

    def _backend(self) -> BlockBackend:
        assert self.export is not None
        backend = self.export.backend
        if backend.stale(self.generation):
            raise BlockError(
                errno.ESTALE,
                f"{backend.name}: the medium changed since this "
                "client connected (on-change=error); connect "
                "again",
            )
        return backend

    async def _read(self, backend: BlockBackend, request: Request) -> None:
        assert self.negotiated is not None
        cookie, offset, length = request.cookie, request.offset, request.length
        view = memoryview(bytearray(length))
        if not self.negotiated.structured:
            await backend.readinto(offset, view)
            self._count(request)
            await self._send(simple_reply(cookie), view)
            return
        if not length:
            self._count(request)
            await self._send(none_chunk(cookie))
            return
        sparse = length >= SPARSE_READ_MIN and not request.flags & DF
        segments = (
            await self._segments(backend, offset, length) if sparse else [(offset, length, False)]
        )
        for index, (start, size, zero) in enumerate(segments):
            done = index == len(segments) - 1
            part = view[start - offset : start - offset + size]
            if not zero:
                await backend.readinto(start, part)
            if done:
                self._count(request)
            if zero:
                await self._send(offset_hole(cookie, start, size, done=done))
            else:
                await self._send(offset_data(cookie, start, size, done=done), part)

    @staticmethod
    async def _segments(
        backend: BlockBackend, offset: int, length: int
    ) -> list[tuple[int, int, bool]]:
        """``(start, length, reads as zeros)`` runs covering a read."""
        segments: list[tuple[int, int, bool]] = []
        position, end = offset, offset + length
        while position < end:
            if len(segments) < MAX_SEGMENTS:
                extent = await backend.block_status(position, end - position)
                size, zero = extent.length, Status.ZERO in extent.status
            else:
                size, zero = end - position, False
            if segments and segments[-1][2] == zero:
                start, before, _ = segments.pop()
                segments.append((start, before + size, zero))
            else:
                segments.append((position, size, zero))
            position += size
        return segments

    async def _block_status(self, backend: BlockBackend, request: Request) -> None:
        """One BLOCK_STATUS chunk per context the client selected: ``base:allocation``,
        and the export's ``qemu:dirty-bitmap:NAME``."""
        assert self.negotiated is not None
        if not request.length:
            raise _Refusal(to_nbd_errno(errno.EINVAL), "block status of nothing")
        chunks = []
        for name, context in self.negotiated.contexts.items():
            descriptors: list[tuple[int, int]] = []
            position, end = request.offset, request.offset + request.length
            while position < end and len(descriptors) < MAX_DESCRIPTORS:
                if name == BASE_ALLOCATION:
                    extent = await backend.block_status(position, end - position)
                    length, flags = extent.length, nbd_state(extent.status)
                else:
                    bitmap = name.removeprefix(DIRTY_BITMAP)
                    length, dirty = await backend.dirty_extent(bitmap, position, end - position)
                    flags = STATE_DIRTY if dirty else 0
                descriptors.append((length, flags))
                position += length
                if request.flags & REQ_ONE:
                    break
            chunks.append((context, merge_extents(descriptors)))
        self._count(request)
        for index, (context, descriptors) in enumerate(chunks):
            done = index == len(chunks) - 1
            await self._send(block_status(request.cookie, context, descriptors, done=done))

    async def _reply_error(self, request: Request, error: int, message: str) -> None:
        assert self.negotiated is not None
        try:
            if self.negotiated.structured:
                await self._send(error_chunk(request.cookie, error, message))
            else:
                await self._send(simple_reply(request.cookie, error))
        except DISCONNECTED:
            self.stop()

    # -- the socket ----------------------------------------------------------------------

    async def _send(self, header: bytes, data: memoryview | None = None) -> None:
        """One message: a header and its data in one ``sendmsg``, never interleaved with
        another reply's."""
        parts = [memoryview(header)] if data is None else [memoryview(header), data]
        async with self._send_lock:
            if self.tls is not None:
                await self.tls.send_all(b"".join(parts))
                return
            while parts:
                parts = unsent(parts, await self.stream.socket.sendmsg(parts))

    async def _exactly(self, count: int) -> bytes:
        while (data := self._rx.take(count)) is None:
            await self._receive_more()
        return data

    async def _fill(self, view: memoryview) -> None:
        done = self._rx.take_into(view)
        while done < view.nbytes:
            received = await self._recv_into(view[done:])
            if not received:
                raise EOFError("the client hung up in the middle of a request")
            done += received

    async def _skip(self, count: int) -> None:
        """Read and drop the data of a request that is refused (too large, past the end)."""
        scratch = memoryview(bytearray(min(count, 1 << 20)))
        while count:
            piece = scratch[: min(count, scratch.nbytes)]
            await self._fill(piece)
            count -= piece.nbytes

    async def _receive_more(self) -> None:
        received = await self._recv_into(self._rx.space())
        if not received:
            raise EOFError("the client hung up")
        self._rx.filled(received)

    async def _recv_into(self, view: memoryview) -> int:
        if self.tls is None:
            return await self.stream.socket.recv_into(view)
        data = await self.tls.receive_some(view.nbytes)
        view[: len(data)] = data
        return len(data)


class _Refusal(Exception):
    """A request answered with an NBD error without the backend failing it."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


def _peer(stream: trio.SocketStream) -> str:
    """Who is connected: the process of a unix socket's peer, the address of a TCP one."""
    sock = stream.socket
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            return f"pid {pid} (uid {uid})"
        except OSError:
            return "unix peer"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "tcp peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
