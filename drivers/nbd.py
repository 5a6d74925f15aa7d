"""``nbd``: a node whose data is an export of an NBD server, as QEMU's nbd driver.

Options are QEMU's: ``server.type=inet`` with ``server.host`` and ``server.port`` (default
10809), or ``server.type=unix`` with ``server.path``; ``export``; ``reconnect-delay`` and
``open-timeout`` (seconds); ``tls-creds`` (a directory laid out as QEMU's tls-creds-x509:
the server's certificate is checked against its ``ca-cert.pem``, ``client-cert.pem`` is
sent where there is one) and ``tls-hostname``. ``request-timeout`` is blkfs's own.
``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH`` (``nbds`` for TLS) are
shorthands for them where a path may be given.

Requests share one connection, many in flight, each reply checked against its request by
:class:`blkfs.nbd.ClientTransmission`. When the server goes away, or a reply takes longer
than ``request-timeout`` (a server that accepts and never answers), the requests in flight
and the new ones wait up to ``reconnect-delay`` seconds for a new connection and are sent
again on it; past that they fail with EIO (and later ones at once) while reconnecting goes
on in the background. With ``reconnect-delay=0``, the default, a lost connection fails the
node until its medium is changed. A request succeeds only on the server's success reply, so
nothing is acknowledged that the server did not acknowledge.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import ssl
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import trio

from blkfs.block import BlockDriver, BlockError, Extent, Option, RangeLocks, Status, WriteFlags
from blkfs.block.driver import ZERO_CHUNK
from blkfs.block.request import align_down, align_up
from blkfs.nbd import (
    BASE_ALLOCATION,
    DEFAULT_PORT,
    NO_FLAGS,
    Address,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    CmdFlag,
    Negotiated,
    ProtocolError,
    ReceiveBuffer,
    Refused,
    Rep,
    Reply,
    State,
    TransmissionFlag,
    unsent,
)
from blkfs.nbd.tls import CredentialsError, client_context

log = logging.getLogger("blkfs.nbd")

NEGOTIATION_TIMEOUT = 30.0
"""Longest a connection attempt and its handshake may take."""
RETRY_FIRST, RETRY_MAX = 0.1, 2.0
"""Seconds between connection attempts: doubling from the first up to the most."""
KEEPALIVE = (30, 10, 3)
"""TCP keepalive: probes after 30 s idle, every 10 s, 3 unanswered ones end the connection."""
CANCELLED_WAIT = 30.0
"""Longest a cancelled caller waits for the reply to its request without a request-timeout
(:meth:`Connection._settle`)."""
MAX_EFFECT = 1 << 30
"""Longest trim, write-zeroes or block status request: the length field has 32 bits."""


async def connect(address: Address) -> trio.SocketStream:
    """A connected stream; over TCP with keepalive, so that a server host that vanishes
    without closing the connection is noticed (KEEPALIVE seconds) and reconnected to."""
    if address.path is not None:
        return await trio.open_unix_socket(address.path)
    assert address.host is not None
    stream = await trio.open_tcp_stream(address.host, address.port)
    idle, interval, count = KEEPALIVE
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    return stream


class Unavailable(BlockError):
    """The server refused the export: not worth trying again at once."""


class Lost(Exception):
    """The connection went away before the reply came: the request may be sent again."""


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Reply | None = None


class Wire:
    """A connection's bytes: the socket itself, or TLS over it once NBD_OPT_STARTTLS has
    succeeded (a copy of each message, where plaintext sends from the caller's buffers)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.tls: trio.SSLStream[trio.SocketStream] | None = None

    async def start_tls(self, context: ssl.SSLContext, hostname: str | None) -> None:
        self.tls = trio.SSLStream(self.stream, context, server_hostname=hostname)
        await self.tls.do_handshake()

    async def send(self, header: bytes, data: memoryview | None = None) -> None:
        """A header and its data in one ``sendmsg`` (resumed where a send stops short)."""
        parts = [memoryview(header)] if data is None else [memoryview(header), data]
        if self.tls is not None:
            await self.tls.send_all(b"".join(parts))
            return
        while parts:
            parts = unsent(parts, await self.stream.socket.sendmsg(parts))

    async def recv_into(self, view: memoryview) -> int:
        if self.tls is None:
            return await self.stream.socket.recv_into(view)
        data = await self.tls.receive_some(view.nbytes)
        view[: len(data)] = data
        return len(data)


class Connection:
    """One negotiated connection: requests go out under a lock (a message is never
    interleaved with another), replies come in through :meth:`receive_replies`."""

    def __init__(self, wire: Wire, negotiated: Negotiated, rx: ReceiveBuffer) -> None:
        self.wire = wire
        self.negotiated = negotiated
        self.transmission = ClientTransmission(negotiated)
        self.rx = rx
        self.lost: str | None = None
        """Why the connection went away, once it has."""
        self.request_timeout = 0.0
        """Seconds a reply may take before the connection is given up as hung (0: forever)."""
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}

    async def call(
        self,
        kind: Cmd,
        offset: int,
        length: int,
        flags: CmdFlag = NO_FLAGS,
        data: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> Reply:
        """Send one request and wait for its reply; :class:`Lost` if the connection went."""
        if self.lost is not None:
            raise Lost(self.lost)
        cookie, header = self.transmission.request(kind, offset, length, flags, buf)
        waiter = self._waiters[cookie] = _Waiter()
        try:
            async with self._send_lock:
                try:
                    await self.wire.send(header, data)
                except BaseException as exc:  # half a message leaves the stream unusable
                    self.close(f"sending failed: {exc!r}")
                    raise
            with trio.move_on_after(self.request_timeout or math.inf) as timer:
                try:
                    await waiter.event.wait()
                except trio.Cancelled:
                    if not timer.cancel_called:  # the caller's cancel, not request-timeout
                        await self._settle(waiter, f"{kind.name} {offset}+{length}")
                    raise
            if timer.cancelled_caught:  # a server that accepts and never answers: hung
                self.close(
                    f"no reply to {kind.name} {offset}+{length} within "
                    f"{self.request_timeout:g}s (request-timeout)"
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise Lost(self.lost) from None
        finally:  # unanswered (cancelled before it went, or timed out): nobody takes it
            if self._waiters.pop(cookie, None) is not None:
                self.transmission.forget(cookie)
        if waiter.reply is None:
            raise Lost(self.lost)
        if waiter.reply.error == errno.ESHUTDOWN:  # the server is going away: come back
            await self.disconnect("the server is shutting down")
            raise Lost(self.lost)
        return waiter.reply

    async def _settle(self, waiter: _Waiter, what: str) -> None:
        """A request sent cannot be taken back: a write left to land later could overwrite
        what a cancelled caller's caller did next (a qcow2 reuses the clusters of a
        cancelled allocating write). So a cancelled caller waits for the reply, as a host
        file's call is waited for (blkfs.block.workers), but for ``request-timeout`` or
        :data:`CANCELLED_WAIT` at most: past that the connection is given up, so that a
        server that stopped answering cannot hold a shutdown for ever."""
        limit = self.request_timeout or CANCELLED_WAIT
        with trio.CancelScope(shield=True), trio.move_on_after(limit):
            await waiter.event.wait()
        if not waiter.event.is_set():
            self.close(f"no reply to the cancelled {what} within {limit:g}s")

    async def receive_replies(self) -> None:
        """Hand every reply to its waiter until the connection goes; returns then."""
        transmission = self.transmission
        try:
            while True:
                magic = await self._exactly(4)
                header = magic + await self._exactly(transmission.header_size(magic) - 4)
                into = transmission.payload(await self._exactly(transmission.header(header)))
                if into is not None:
                    await self._fill(into)
                reply = transmission.end()
                if reply is not None:
                    waiter = self._waiters.pop(reply.cookie, None)
                    if waiter is not None:
                        waiter.reply = reply
                        waiter.event.set()
        except (
            OSError,
            EOFError,
            ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            self.close(str(exc) or type(exc).__name__)

    async def _exactly(self, count: int) -> bytes:
        while (data := self.rx.take(count)) is None:
            received = await self.wire.recv_into(self.rx.space())
            if not received:
                raise EOFError("the server closed the connection")
            self.rx.filled(received)
        return data

    async def _fill(self, view: memoryview) -> None:
        done = self.rx.take_into(view)
        while done < view.nbytes:
            received = await self.wire.recv_into(view[done:])
            if not received:
                raise EOFError("the server closed the connection")
            done += received

    def close(self, why: str) -> None:
        """Give the connection up: every waiter learns it is lost."""
        if self.lost is not None:
            return
        self.lost = why
        self.wire.stream.socket.close()
        self.transmission.abandon()
        for waiter in self._waiters.values():
            waiter.event.set()
        self._waiters.clear()

    async def disconnect(self, why: str = "disconnected") -> None:
        """NBD_CMD_DISC, the polite goodbye, then close."""
        if self.lost is None:
            _, header = self.transmission.request(Cmd.DISC)
            with trio.move_on_after(1):
                try:
                    async with self._send_lock:
                        await self.wire.send(header)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
        self.close(why)


@dataclass(frozen=True)
class Tls:
    """TLS as the node asks for it: the client's context (the CA, a client certificate if
    the credentials hold one) and the name the server's certificate must carry."""

    context: ssl.SSLContext
    hostname: str | None
    """None on a unix socket without tls-hostname: the CA is checked, no name (as QEMU)."""


async def negotiate(address: Address, export: str, tls: Tls | None) -> Connection:
    """Connect and negotiate ``export``; BlockError saying what went wrong otherwise."""
    where = f"nbd: {address}"
    wire: Wire | None = None
    try:
        with trio.fail_after(NEGOTIATION_TIMEOUT):
            wire = Wire(await connect(address))
            try:
                return await _handshake(wire, export, tls)
            except BaseException:
                await trio.aclose_forcefully(wire.stream)
                raise
    except trio.TooSlowError:
        raise BlockError(
            errno.ETIMEDOUT, f"{where}: no answer within {NEGOTIATION_TIMEOUT:.0f}s"
        ) from None
    except Refused as exc:
        listed = f" (the server has: {', '.join(exc.exports)})" if exc.exports else ""
        code = errno.EACCES if exc.reply in (Rep.ERR_TLS_REQD, Rep.ERR_POLICY) else errno.ENOENT
        raise Unavailable(code, f"{where}: export '{export}': {exc}{listed}") from None
    except ProtocolError as exc:
        raise BlockError(errno.EPROTO, f"{where}: not a usable NBD server: {exc}") from None
    except (EOFError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise Unavailable(
                errno.EACCES, f"{where}: TLS failed: {cause.reason or cause}"
            ) from None
        if wire is not None and wire.tls is not None:  # TLS 1.3 checks the client after
            raise Unavailable(
                errno.EACCES,
                f"{where}: the server closed the TLS connection during the negotiation "
                "(does it want a client certificate, or one signed by another CA?)",
            ) from None
        if isinstance(exc, EOFError):
            raise BlockError(
                errno.EPROTO, f"{where}: not a usable NBD server: the server hung up"
            ) from None
        raise BlockError(errno.ECONNRESET, f"{where}: {os.strerror(errno.ECONNRESET)}") from None
    except OSError as exc:
        code = exc.errno or errno.ECONNRESET
        raise BlockError(code, f"{where}: {os.strerror(code)}") from None


async def _handshake(wire: Wire, export: str, tls: Tls | None) -> Connection:
    handshake = ClientHandshake(export, tls=tls is not None)
    rx = ReceiveBuffer()
    while not handshake.done:
        want = handshake.want()
        while (data := rx.take(want)) is None:
            received = await wire.recv_into(rx.space())
            if not received:
                raise EOFError("the server hung up during the handshake")
            rx.filled(received)
        try:
            out = handshake.receive(data)
        except Refused:
            await wire.send(handshake.abort())
            raise
        if handshake.upgrade:
            assert tls is not None
            if len(rx):
                raise ProtocolError("the server sent data before the TLS handshake")
            await wire.start_tls(tls.context, tls.hostname)
            out = handshake.secured()
        if out:
            await wire.send(out)
    assert handshake.result is not None
    return Connection(wire, handshake.result, rx)


class Client:
    """Requests to one export over whichever connection is up; reconnects when it goes."""

    def __init__(
        self,
        address: Address,
        export: str,
        reconnect_delay: float,
        open_timeout: float,
        writable: bool,
        tls: Tls | None,
        request_timeout: float,
    ) -> None:
        self.address = address
        self.export = export
        self.tls = tls
        self.request_timeout = request_timeout
        self.reconnect_delay = reconnect_delay
        self.open_timeout = open_timeout
        self.writable = writable
        self.connection: Connection | None = None
        self.reconnects = 0
        self._lost_at = 0.0
        self._why = ""
        """Why the last connection was lost."""
        self._back = trio.Event()
        self._scope = trio.CancelScope()
        self._finished: trio.Event | None = None
        """Set when the connection task ends (None until it starts)."""

    @property
    def negotiated(self) -> Negotiated:
        assert self.connection is not None
        return self.connection.negotiated

    async def open(self) -> None:
        """The first connection (retried for ``open_timeout`` seconds); then the task that
        receives replies and reconnects runs until :meth:`close`."""
        connection = await self._connect(trio.current_time() + self.open_timeout)
        try:
            self._check(connection.negotiated)
        except BlockError:
            await connection.disconnect()
            raise
        self.connection = connection
        self._finished = trio.Event()
        trio.lowlevel.spawn_system_task(self._run, name=f"nbd client {self.address}")

    def _check(self, negotiated: Negotiated) -> None:
        if self.writable and negotiated.export.flags & TransmissionFlag.READ_ONLY:
            raise BlockError(
                errno.EROFS,
                f"nbd: {self.address} exports '{self.export}' read-only; open it with read-only=on",
            )

    async def _connect(self, deadline: float | None) -> Connection:
        """A negotiated connection, trying until ``deadline`` (None: forever); an export
        that the server refuses fails at once, unless trying forever."""
        pause = RETRY_FIRST
        while True:
            try:
                connection = await negotiate(self.address, self.export, self.tls)
                connection.request_timeout = self.request_timeout
                return connection
            except BlockError as exc:
                if deadline is not None and (
                    isinstance(exc, Unavailable) or trio.current_time() + pause > deadline
                ):
                    raise
                log.debug("%s", exc)
            await trio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _run(self) -> None:
        try:
            with self._scope:
                while True:
                    connection = self.connection
                    assert connection is not None
                    await connection.receive_replies()
                    self._gone(connection)
                    if not self.reconnect_delay:
                        log.error(
                            "nbd: lost %s (%s); reconnect-delay is 0: the node fails "
                            "until its medium is changed",
                            self.address,
                            connection.lost,
                        )
                        return
                    log.warning(
                        "nbd: lost %s (%s); reconnecting, requests wait up to %gs",
                        self.address,
                        connection.lost,
                        self.reconnect_delay,
                    )
                    self.connection = await self._reconnect(connection.negotiated)
                    self.reconnects += 1
                    self._back.set()
                    log.info("nbd: reconnected to %s", self.address)
        except Exception:  # a system task must not raise: it would end the whole run
            log.exception("nbd: %s: the connection task failed", self.address)
            if self.connection is not None:
                self.connection.close("the connection task failed")
                self._gone(self.connection)
        finally:
            assert self._finished is not None
            self._finished.set()

    def _gone(self, connection: Connection) -> None:
        if self.connection is connection:
            self.connection = None
            self._lost_at = trio.current_time()
            self._why = connection.lost or "closed"
            self._back = trio.Event()

    async def _reconnect(self, before: Negotiated) -> Connection:
        """A new connection to the same export: same size, still writable if it was."""
        while True:
            connection = await self._connect(None)
            export = connection.negotiated.export
            try:
                self._check(connection.negotiated)
                if export.size != before.export.size:
                    raise BlockError(
                        errno.EIO,
                        f"nbd: {self.address} export '{self.export}' "
                        f"is now {export.size} bytes, not "
                        f"{before.export.size}",
                    )
                return connection
            except BlockError as exc:
                log.error("%s; trying again", exc)
                connection.close("a different export")
                await trio.sleep(RETRY_MAX)

    async def call(
        self,
        kind: Cmd,
        offset: int,
        length: int,
        flags: CmdFlag = NO_FLAGS,
        data: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> Reply:
        """One request, sent again on a new connection if the one it went out on is lost
        within ``reconnect-delay``; EIO if no connection comes back in time."""
        while True:
            connection = await self._connection()
            try:
                return await connection.call(kind, offset, length, flags, data, buf)
            except Lost:
                self._gone(connection)

    async def _connection(self) -> Connection:
        while True:
            connection = self.connection
            if connection is not None and connection.lost is None:
                return connection
            deadline = self._lost_at + self.reconnect_delay
            if trio.current_time() >= deadline or self._scope.cancel_called:
                raise BlockError(
                    errno.EIO,
                    f"nbd: {self.address}: the connection is lost ({self._why}) "
                    + (
                        f"and did not come back within {self.reconnect_delay:g}s"
                        if self.reconnect_delay
                        else "(reconnect-delay=0)"
                    ),
                )
            with trio.move_on_at(deadline):
                await self._back.wait()

    async def close(self) -> None:
        self._scope.cancel()
        if self._finished is not None:
            await self._finished.wait()
        if self.connection is not None:
            await self.connection.disconnect()


class NbdDriver(BlockDriver):
    name = "nbd"
    options = {
        "server.type": Option("enum", "inet", "how to reach the server", choices=("inet", "unix")),
        "server.host": Option("str", None, "its host name or address (server.type=inet)"),
        "server.port": Option("int", DEFAULT_PORT, "its TCP port (server.type=inet)", minimum=1),
        "server.path": Option("str", None, "its unix socket (server.type=unix)"),
        "export": Option("str", "", "the export's name (default: the server's default)"),
        "reconnect-delay": Option(
            "duration",
            0,
            "seconds requests wait for a lost server to "
            "come back (0: a lost server fails the node)",
        ),
        "open-timeout": Option(
            "duration", 0, "seconds to keep trying to connect when opening (0: one attempt)"
        ),
        "request-timeout": Option(
            "duration",
            0,
            "seconds a reply may take; past that the connection counts as lost, as if the "
            "server had gone (0: wait forever)",
        ),
        "tls-creds": Option(
            "str",
            None,
            "connect over TLS with the x509 credentials in this directory (ca-cert.pem; "
            "client-cert.pem and client-key.pem if the server checks clients)",
        ),
        "tls-hostname": Option(
            "str", None, "the name the server's certificate must carry (default: server.host)"
        ),
    }

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        address = _address(values)
        self.node.check_nbd_server(address.path, address.host, address.port)
        tls = await _tls(values, address)
        self.client = Client(
            address,
            values["export"],
            values["reconnect-delay"],
            values["open-timeout"],
            writable=not self.node.read_only,
            tls=tls,
            request_timeout=values["request-timeout"],
        )
        await self.client.open()
        negotiated = self.client.negotiated
        export = negotiated.export
        self.flags = export.flags
        self.supported_write_flags = _write_flags(export.flags)
        self.size = export.size
        self.max_payload = min(export.max_payload, MAX_EFFECT)
        self.request_alignment = export.min_block
        self._blocks = RangeLocks()
        self.block_status_context = BASE_ALLOCATION in negotiated.contexts
        self.where = f"nbd: {address} export '{values['export']}'" + (" over TLS" if tls else "")
        log.info(
            "%s: %d bytes, flags %#x, block sizes %d/%d/%d%s",
            self.where,
            export.size,
            export.flags,
            export.min_block,
            export.preferred_block,
            export.max_payload,
            ", base:allocation" if self.block_status_context else "",
        )

    async def close(self) -> None:
        await self.client.close()

    def reusable(self) -> bool:
        """A new medium may take this node over only while it is connected; one that lost
        its server connects afresh."""
        connection = self.client.connection
        return connection is not None and connection.lost is None

    async def _call(
        self,
        kind: Cmd,
        offset: int,
        length: int,
        flags: CmdFlag = NO_FLAGS,
        data: memoryview | None = None,
        buf: memoryview | None = None,
    ) -> Reply:
        reply = await self.client.call(kind, offset, length, flags, data, buf)
        if reply.error:
            raise BlockError(
                reply.error,
                f"{self.where}: {kind.name} {offset}+{length}: "
                f"{reply.message or os.strerror(reply.error)}",
            )
        return reply

    def _pieces(self, offset: int, length: int, most: int) -> list[tuple[int, int]]:
        """``(start, length)`` of requests of at most ``most`` bytes covering the range."""
        most -= most % self.request_alignment
        return [
            (start, min(most, offset + length - start))
            for start in range(offset, offset + length, most)
        ]

    async def read(self, offset: int, buf: memoryview) -> None:
        for start, length in self._pieces(offset, buf.nbytes, self.max_payload):
            await self._call(
                Cmd.READ, start, length, buf=buf[start - offset : start - offset + length]
            )

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        async with self._hold(offset, data.nbytes):
            await self._write(offset, data, _fua(flags))

    async def _write(self, offset: int, data: memoryview, flags: CmdFlag = NO_FLAGS) -> None:
        for start, length in self._pieces(offset, data.nbytes, self.max_payload):
            await self._call(
                Cmd.WRITE,
                start,
                length,
                flags,
                data=data[start - offset : start - offset + length],
            )

    def _hold(self, offset: int, length: int) -> AbstractAsyncContextManager[Any]:
        """Writes wait for the blocks this driver read-modify-writes itself (the edges of
        a zeroing that is not aligned to the server's minimum block): the layer aligns
        writes, not write-zeroes. With no alignment to keep, nothing is held."""
        if self.request_alignment == 1:
            return nullcontext()
        return self._blocks.hold(offset, length)

    async def flush(self) -> None:
        if self.flags & TransmissionFlag.SEND_FLUSH:
            await self._call(Cmd.FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM of the whole blocks in the range (a discard is advisory)."""
        align = self.request_alignment
        start, end = align_up(offset, align), align_down(offset + length, align)
        if self.flags & TransmissionFlag.SEND_TRIM and start < end:
            for piece, size in self._pieces(start, end - start, MAX_EFFECT):
                await self._call(Cmd.TRIM, piece, size)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """NBD_CMD_WRITE_ZEROES where the server has it (NO_HOLE unless ``unmap`` allows a
        hole; FAST_ZERO for NO_FALLBACK, which the server answers with ENOTSUP where it
        would be slow), else zeros written; parts of blocks at the edges are
        read-modify-written."""
        align = self.request_alignment
        start, end = align_up(offset, align), align_down(offset + length, align)
        fua = _fua(flags)
        if flags & WriteFlags.NO_FALLBACK and (start != offset or end != offset + length):
            raise BlockError(
                errno.ENOTSUP, f"{self.where}: a fast zero of part of a block ({offset}+{length})"
            )
        if start >= end:
            await self._zero_edge(offset, length, fua)
            return
        if offset < start:
            await self._zero_edge(offset, start - offset, fua)
        if self.flags & TransmissionFlag.SEND_WRITE_ZEROES:
            command = fua | (NO_FLAGS if unmap else CmdFlag.NO_HOLE)
            if flags & WriteFlags.NO_FALLBACK:
                command |= CmdFlag.FAST_ZERO
            for piece, size in self._pieces(start, end - start, MAX_EFFECT):
                await self._call(Cmd.WRITE_ZEROES, piece, size, command)
        else:
            zeros = memoryview(bytes(min(end - start, ZERO_CHUNK)))
            for piece, size in self._pieces(start, end - start, ZERO_CHUNK):
                async with self._hold(piece, size):
                    await self._write(piece, zeros[:size], fua)
        if end < offset + length:
            await self._zero_edge(end, offset + length - end, fua)

    async def _zero_edge(self, offset: int, length: int, fua: CmdFlag) -> None:
        align = self.request_alignment
        start, end = align_down(offset, align), min(align_up(offset + length, align), self.size)
        async with self._blocks.hold(start, end - start):
            block = bytearray(end - start)
            await self.read(start, memoryview(block))
            block[offset - start : offset - start + length] = bytes(length)
            await self._write(start, memoryview(block), fua)

    async def length(self) -> int:
        return self.size

    async def block_status(self, offset: int, length: int) -> Extent:
        """``base:allocation`` of the first extent: a hole that reads as zeros is zero,
        anything else is data (a hole of unknown contents must still be read)."""
        if not self.block_status_context:
            return await super().block_status(offset, length)
        align = self.request_alignment
        start = align_down(offset, align)
        end = min(align_up(offset + min(length, MAX_EFFECT), align), self.size)
        reply = await self._call(Cmd.BLOCK_STATUS, start, end - start, CmdFlag.REQ_ONE)
        extent_length, flags = reply.extents[0]
        extent_length -= offset - start
        if extent_length <= 0:  # a descriptor smaller than a block: the server broke a SHOULD
            return Extent(min(length, start + align - offset), Status.DATA | Status.ALLOCATED)
        status = Status.ALLOCATED
        if flags & State.ZERO:
            status |= Status.ZERO
        if not flags & State.HOLE or not flags & State.ZERO:
            status |= Status.DATA
        return Extent(min(extent_length, length), status)

    def info(self) -> dict[str, Any]:
        connection = self.client.connection
        return {
            "connected": connection is not None and connection.lost is None,
            "reconnects": self.client.reconnects,
            "in-flight": connection.transmission.in_flight if connection else 0,
            "tls": self.client.tls is not None,
        }


async def _tls(values: Mapping[str, Any], address: Address) -> Tls | None:
    """The node's TLS, its credentials read in a worker; EINVAL naming a bad file."""
    creds, hostname = values["tls-creds"], values["tls-hostname"]
    if creds is None:
        if hostname is not None:
            raise BlockError(errno.EINVAL, "nbd: tls-hostname needs tls-creds=DIR")
        return None
    if not os.path.isabs(creds):
        raise BlockError(errno.EINVAL, f"nbd: tls-creds '{creds}' must be an absolute directory")
    name = hostname or address.host
    try:
        context = await trio.to_thread.run_sync(client_context, creds, name is not None)
    except CredentialsError as exc:
        raise BlockError(errno.EINVAL, f"nbd: {exc}") from None
    return Tls(context, name)


def _write_flags(flags: TransmissionFlag) -> WriteFlags:
    """The write flags a server takes: FUA as NBD_CMD_FLAG_FUA, NO_FALLBACK as
    NBD_CMD_FLAG_FAST_ZERO; without them the layer writes then flushes, or refuses a fast
    zero at once."""
    supported = WriteFlags.NONE
    if flags & TransmissionFlag.SEND_FUA:
        supported |= WriteFlags.FUA
    if flags & TransmissionFlag.SEND_WRITE_ZEROES and flags & TransmissionFlag.SEND_FAST_ZERO:
        supported |= WriteFlags.NO_FALLBACK
    return supported


def _fua(flags: WriteFlags) -> CmdFlag:
    return CmdFlag.FUA if flags and flags & WriteFlags.FUA else NO_FLAGS


def _address(values: Mapping[str, Any]) -> Address:
    if values["server.type"] == "unix":
        if not values["server.path"]:
            raise BlockError(errno.EINVAL, "nbd: server.type=unix needs server.path")
        return Address(path=values["server.path"])
    if not values["server.host"]:
        raise BlockError(errno.EINVAL, "nbd: server.type=inet needs server.host")
    return Address(host=values["server.host"], port=values["server.port"])
