"""Exports and the sockets they are offered on.

An :class:`Export` offers one backend under a name; a :class:`Listener` is one listening
socket and the exports a client may choose from there (``NBD_OPT_LIST`` shows them, and the
empty name is the only one, if there is one). What a client is told of an export is asked of
the backend at the moment it asks: its size, whether it is writable, its limits.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import trio

from blkfs.backend import BlockBackend
from blkfs.errors import BlockError
from blkfs.frontends.unix_socket import clear_stale_socket
from blkfs.info import ExportStatus
from blkfs.nbd import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PORT,
    DIRTY_BITMAP,
    Address,
    Catalog,
    ExportInfo,
    Refused,
    Rep,
    TransmissionFlag,
)
from blkfs.nbd.authz import AuthzError, read_allowed
from blkfs.nbd.tls import CredentialsError, server_context

if TYPE_CHECKING:
    from blkfs.frontends.nbd.session import Session

log = logging.getLogger("blkfs.nbd")

SERVED = TransmissionFlag.SEND_FLUSH | TransmissionFlag.CAN_MULTI_CONN
"""Offered on every export: one backend serves every connection, so a flush on one covers
writes acknowledged on another (NBD_FLAG_CAN_MULTI_CONN)."""
WRITING = (
    TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
"""Offered on writable exports."""


def parse_address(text: str) -> Address:
    """``unix:PATH``, ``HOST:PORT`` or ``[IPV6]:PORT``, as ``blkfs mount --nbd`` takes it."""
    if text.startswith("unix:"):
        return address(socket_path=text[5:])
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise BlockError(errno.EINVAL, f"NBD address '{text}': expected unix:PATH or HOST:PORT")
    return address(host=host.removeprefix("[").removesuffix("]"), port=port)


def address(
    socket_path: str | None = None, host: str | None = None, port: str | None = None
) -> Address:
    """An address from the export command's words; EINVAL saying what is wrong."""
    if socket_path is not None:
        if not os.path.isabs(socket_path):
            raise BlockError(errno.EINVAL, f"socket path '{socket_path}' must be absolute")
        return Address(path=socket_path)
    if not host:
        raise BlockError(errno.EINVAL, "a TCP export needs host= (blkfs listens only where told)")
    try:
        number = DEFAULT_PORT if port is None else int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise BlockError(errno.EINVAL, f"port must be a number from 0 to 65535 (got {port!r})")
    return Address(host=host, port=number)


def socket_mode(text: str | None) -> int:
    """A unix socket's permission bits from octal text (``0660``); 0600 if not given."""
    if text is None:
        return 0o600
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise BlockError(
            errno.EINVAL, f"mode must be octal permission bits such as 0660 (got {text!r})"
        )
    return mode


@dataclass(frozen=True)
class Tls:
    """How a socket's clients must secure their connection: TLS with the credentials in
    ``creds`` (QEMU's tls-creds-x509 layout), client certificates checked if
    ``verify_peer``; no TLS if ``creds`` is None."""

    creds: str | None = None
    verify_peer: bool = False
    authz: str | None = None
    """The tls-authz file (:mod:`blkfs.nbd.authz`): the client certificates let in."""

    def __str__(self) -> str:
        if self.creds is None:
            return "in plaintext"
        checked = ", client certificates checked" if self.verify_peer else ""
        allowed = f", allowed by {self.authz}" if self.authz else ""
        return f"over TLS (credentials in {self.creds}{checked}{allowed})"

    def context(self) -> ssl.SSLContext | None:
        """The server's TLS context, read from the files now; EINVAL naming a bad file."""
        if self.creds is None:
            return None
        try:
            return server_context(self.creds, self.verify_peer)
        except CredentialsError as exc:
            raise BlockError(errno.EINVAL, str(exc)) from None

    def allowed(self) -> tuple[str, ...] | None:
        """The tls-authz file's patterns, read now; None: any verified certificate."""
        if self.authz is None:
            return None
        try:
            return read_allowed(self.authz)
        except AuthzError as exc:
            raise BlockError(errno.EINVAL, str(exc)) from None


PLAINTEXT = Tls()


def tls_setting(
    where: Address,
    creds: str | None,
    tls: bool | None,
    verify_peer: bool | None,
    authz: str | None = None,
) -> Tls:
    """The TLS a socket at ``where`` gets from the export command's words: plaintext TCP
    only when ``tls=off`` says so, since anyone who reaches the port could read and write
    the disk. A tls-authz file checks client certificates, so it needs them verified."""
    if creds is not None and not os.path.isabs(creds):
        raise BlockError(errno.EINVAL, f"tls-creds '{creds}' must be an absolute directory")
    if authz is not None and not os.path.isabs(authz):
        raise BlockError(errno.EINVAL, f"tls-authz '{authz}' must be an absolute file name")
    if authz is not None and verify_peer is False:
        raise BlockError(
            errno.EINVAL,
            "tls-authz checks the client's certificate: it cannot be given with "
            "tls-verify-peer=off",
        )
    if tls is False and (creds is not None or verify_peer or authz is not None):
        raise BlockError(
            errno.EINVAL, "tls=off cannot be given with tls-creds, tls-verify-peer or tls-authz"
        )
    if creds is None and (tls or verify_peer or authz is not None):
        raise BlockError(
            errno.EINVAL, "TLS needs tls-creds=DIR (ca-cert.pem, server-cert.pem, server-key.pem)"
        )
    if creds is None and where.host is not None and tls is None:
        raise BlockError(
            errno.EINVAL,
            f"{where} is TCP: give tls-creds=DIR to require TLS, or tls=off to serve "
            "plaintext that anyone reaching the port can read and write",
        )
    return Tls(creds, bool(verify_peer) or authz is not None, authz)


@dataclass
class ExportStats:
    """Requests through one export, by kind (its clients together)."""

    ops: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    connections: int = 0

    def count(self, kind: str, nbytes: int) -> None:
        self.ops[kind] = self.ops.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    def as_dict(self) -> dict[str, int]:
        flat = {f"{kind}_ops": ops for kind, ops in self.ops.items()}
        flat.update({f"{kind}_bytes": n for kind, n in self.bytes.items()})
        flat["errors"] = self.errors
        flat["connections"] = self.connections
        return flat


@dataclass(eq=False)
class Export:
    """A backend offered to NBD clients under ``name``."""

    name: str
    backend: BlockBackend
    writable: bool
    listener: Listener
    sessions: set[Session] = field(default_factory=set)
    stats: ExportStats = field(default_factory=ExportStats)
    retired: bool = False
    """No longer offered (export-del, or its backend deleted); its clients may remain."""
    bitmap: str | None = None
    """The dirty bitmap served as ``qemu:dirty-bitmap:NAME``; busy while exported."""

    def info(self) -> ExportInfo:
        """What a client is told now; Refused if the backend has no medium to serve."""
        backend = self.backend
        if not backend.has_medium:
            raise Refused(Rep.ERR_UNKNOWN, f"{backend.name}: no medium")
        limits = backend.limits()
        flags = SERVED
        if self.writable and not backend.read_only:
            flags |= WRITING
        else:
            flags |= TransmissionFlag.READ_ONLY
        preferred = 1 << max(12, (limits.request_alignment - 1).bit_length())
        return ExportInfo(
            self.name,
            backend.length(),
            flags,
            min_block=1,
            preferred_block=preferred,
            max_payload=max(preferred, min(limits.max_transfer, DEFAULT_MAX_PAYLOAD)),
            description=f"blkfs backend {backend.name}",
            meta_contexts=(DIRTY_BITMAP + self.bitmap,) if self.bitmap else (),
        )

    def status(self) -> ExportStatus:
        status: ExportStatus = {
            "name": self.name,
            "backend": self.backend.name,
            "writable": self.writable,
            "address": str(self.listener.address),
            "tls": self.listener.tls_context is not None,
            "retired": self.retired,
            "clients": [s.status() for s in self.sessions],
            "stats": self.stats.as_dict(),
        }
        if self.bitmap:
            status["bitmap"] = self.bitmap
        return status


class Listener(Catalog):
    """One listening socket and the exports offered on it."""

    def __init__(self, where: Address, permanent: bool, tls: Tls = PLAINTEXT) -> None:
        self.address = where
        self.permanent = permanent
        """The mount's own server (--nbd): it stays when its last export goes."""
        self.tls = tls
        self.tls_context: ssl.SSLContext | None = None
        """What STARTTLS runs with (read by :meth:`open`); None: the socket is plaintext."""
        self.tls_allowed: tuple[str, ...] | None = None
        """The patterns of the tls-authz file (read by :meth:`open`); None: no such file."""
        self.exports: dict[str, Export] = {}
        self.sessions: set[Session] = set()
        self.scope = trio.CancelScope()
        self.listeners: list[trio.SocketListener] = []

    def find(self, name: str) -> Export | None:
        """The export a client names: the empty name is the only export, if there is one."""
        export = self.exports.get(name)
        if export is None and not name and len(self.exports) == 1:
            export = next(iter(self.exports.values()))
        return export

    def lookup(self, name: str) -> ExportInfo:
        export = self.find(name)
        if export is None:
            raise Refused(Rep.ERR_UNKNOWN, f"no export named '{name}' here")
        return export.info()

    def list(self) -> list[ExportInfo]:
        return [
            ExportInfo(
                e.name, 0, TransmissionFlag(0), description=f"blkfs backend {e.backend.name}"
            )
            for e in self.exports.values()
        ]

    async def open(self, mode: int) -> None:
        """Read the TLS credentials and tls-authz file, bind and listen; a unix socket gets
        ``mode`` before anyone can connect."""
        self.tls_context = await trio.to_thread.run_sync(self.tls.context)
        self.tls_allowed = await trio.to_thread.run_sync(self.tls.allowed)
        try:
            if self.address.path is not None:
                self.listeners = [await self._unix(self.address.path, mode)]
            else:
                assert self.address.host is not None
                self.listeners = await trio.open_tcp_listeners(
                    self.address.port, host=self.address.host
                )
                if not self.address.port:  # port 0: the one the system chose
                    port = self.listeners[0].socket.getsockname()[1]
                    self.address = Address(host=self.address.host, port=port)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise BlockError(
                code, f"cannot listen on {self.address}: {os.strerror(code)}"
            ) from None

    @staticmethod
    async def _unix(path: str, mode: int) -> trio.SocketListener:
        await clear_stale_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, mode)  # before listen(): until then nobody can connect
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(sock)

    def close(self) -> None:
        """Stop accepting; a unix socket's file goes with it."""
        self.scope.cancel()
        for listener in self.listeners:
            listener.socket.close()
        self.listeners = []
        if self.address.path is not None:
            try:
                os.unlink(self.address.path)
            except FileNotFoundError:
                pass


class Unauthorized(Catalog):
    """What a listener offers a client whose verified certificate its tls-authz file does
    not allow: nothing. Each export asked for is refused with NBD_REP_ERR_POLICY (the
    client's tools show the message) and logged once with its backend and the certificate's
    name (QEMU asks for an export's contexts before it goes to it); so is the export list,
    which would tell what the socket serves."""

    def __init__(self, listener: Listener, peer: str, name: str) -> None:
        self.listener, self.peer, self.name = listener, peer, name
        self.reason = f"client certificate '{name}' is not allowed by tls-authz"
        self._logged: set[str] = set()

    def lookup(self, name: str) -> ExportInfo:
        export = self.listener.find(name)
        self._refused(f"export '{name}'", export.backend.name if export else None)

    def list(self) -> list[ExportInfo]:
        self._refused("the export list", None)

    def _refused(self, what: str, backend: str | None) -> NoReturn:
        if what not in self._logged:
            self._logged.add(what)
            log.warning(
                "%snbd: %s on %s refused %s: %s %s",
                f"{backend}: " if backend else "",
                self.peer,
                self.listener.address,
                what,
                self.reason,
                self.listener.tls.authz,
            )
        raise Refused(Rep.ERR_POLICY, self.reason)
