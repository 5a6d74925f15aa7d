"""The NBD frontend: backends exported over NBD, for QEMU, nbd-client, nbdcopy, libnbd and
other blkfs daemons.

Exports come from the ``export`` command (``.ctl/export``, ``blkfs ctl``, ``--export``, the
config): each on the mount's NBD server (``--nbd``) or on a unix socket or TCP address of its
own, which several exports may share (clients choose by name) and which closes with its
last export. Nothing listens anywhere unless told; a unix socket is mode 0600 unless told
otherwise. A client holds its backend as an open file does: a deleted backend serves its
clients until they leave, media changes drain their requests, a writable client counts as
a writer (eject and change need force=on), no medium is ENOMEDIUM, a read-only one EROFS.
:mod:`~blkfs.frontends.nbd.session` serves one client, :mod:`~blkfs.frontends.nbd.export`
holds what is offered where.
"""

from __future__ import annotations

import errno
import functools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from blkfs.backend import BlockBackend
from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.nbd.export import (
    PLAINTEXT,
    Export,
    Listener,
    Tls,
    address,
    socket_mode,
    tls_setting,
)
from blkfs.frontends.nbd.session import Budget, Session
from blkfs.info import ExportStatus
from blkfs.layer import BlockLayer
from blkfs.nbd import Address

log = logging.getLogger("blkfs.nbd")

MAX_CLIENTS = 128
"""Connections one socket serves at once; more are closed as they come."""
TOTAL_BYTES = 512 << 20
"""Request buffers every client together may hold."""


class NbdFrontend:
    """The daemon's NBD server: its listeners, their exports and clients."""

    name = "nbd"

    def __init__(
        self,
        layer: BlockLayer,
        commands: Commands,
        server: Address | None = None,
        exports: Sequence[Mapping[str, Any]] = (),
        mode: int = 0o600,
        tls: Tls = PLAINTEXT,
    ) -> None:
        self.commands = commands
        self.server = server
        """The mount's own NBD server (--nbd), where exports go by default."""
        self.mode = mode
        self.tls = tls
        """The TLS the mount's own server requires (--nbd-tls-creds)."""
        self.initial = list(exports)
        """``export`` commands to run at start (--export, the config)."""
        self.default: Listener | None = None
        self.listeners: dict[Address, Listener] = {}
        self.exports: dict[str, Export] = {}
        self.retired: set[Export] = set()
        """Exports withdrawn while clients were connected, until those leave."""
        self._releases: dict[Export, Callable[[], None]] = {}
        """What frees the bitmap an export serves, when it is withdrawn."""
        self.budget = Budget(TOTAL_BYTES)
        self.sessions: set[Session] = set()
        """Every client, including those of sockets closed since they connected."""
        self._watched: weakref.WeakSet[BlockBackend] = weakref.WeakSet()
        self._nursery: trio.Nursery | None = None
        self._stopping = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        failure: BlockError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if self.server is not None:
                    self.default = await self._listen(
                        self.server, self.mode, permanent=True, tls=self.tls
                    )
                for args in self.initial:
                    await self.commands.run("export", args)
            except BlockError as exc:
                failure = exc
            else:
                task_status.started()
                await self._stopping.wait()
            self._shut_down()
        if failure is not None:
            raise failure

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Nothing is left once :meth:`serve` has returned: its sockets are gone."""

    def _shut_down(self) -> None:
        """Stop listening (removing socket files) and let every client go once its requests
        in flight are answered; the nursery waits for them."""
        for listener in list(self.listeners.values()):
            listener.close()
        self.listeners.clear()
        for session in list(self.sessions):
            session.stop()

    # -- listening -----------------------------------------------------------------------

    async def _listen(self, where: Address, mode: int, permanent: bool, tls: Tls) -> Listener:
        assert self._nursery is not None
        listener = Listener(where, permanent, tls)
        await listener.open(mode)
        self.listeners[listener.address] = listener
        self._nursery.start_soon(self._accept, listener)
        log.info("nbd: listening on %s %s", listener.address, tls)
        return listener

    async def _accept(self, listener: Listener) -> None:
        assert self._nursery is not None
        with listener.scope:
            try:
                await trio.serve_listeners(
                    functools.partial(self._session, listener),
                    listener.listeners,
                    handler_nursery=self._nursery,
                )
            except trio.ClosedResourceError:
                pass

    async def _session(self, listener: Listener, stream: trio.SocketStream) -> None:
        if len(listener.sessions) >= MAX_CLIENTS:
            log.warning(
                "nbd: %s already serves %d clients; refusing one more",
                listener.address,
                MAX_CLIENTS,
            )
            await trio.aclose_forcefully(stream)
            return
        session = Session(stream, listener, self.budget)
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:  # a bug: this client goes, the daemon and the others stay
            log.exception("nbd: a session on %s failed", listener.address)
        finally:
            self.sessions.discard(session)

    # -- the export commands (blkfs.commands.Exporter) ---------------------------------

    async def add(
        self,
        backend: BlockBackend,
        export_name: str,
        writable: bool,
        *,
        socket: str | None,
        host: str | None,
        port: str | None,
        mode: str | None,
        bitmap: str | None = None,
        tls_creds: str | None = None,
        tls: bool | None = None,
        tls_verify_peer: bool | None = None,
        tls_authz: str | None = None,
    ) -> None:
        if self._nursery is None or self._stopping.is_set():
            raise BlockError(errno.ESHUTDOWN, "the NBD frontend is not serving")
        if export_name in self.exports:
            raise BlockError(errno.EEXIST, f"an export named '{export_name}' already exists")
        if len(export_name.encode()) > 4096 or "\0" in export_name:
            raise BlockError(errno.EINVAL, "an export name is at most 4096 bytes, no NUL")
        permissions = socket_mode(mode)
        if mode is not None and socket is None:
            raise BlockError(errno.EINVAL, "mode= is for the export's own socket=PATH")
        release = backend.hold_bitmap(bitmap) if bitmap is not None else None
        try:
            listener = await self._listener_for(
                socket, host, port, permissions, (tls_creds, tls, tls_verify_peer, tls_authz)
            )
        except BaseException:
            if release is not None:
                release()
            raise
        export = Export(export_name, backend, writable, listener, bitmap=bitmap)
        if release is not None:
            self._releases[export] = release
        listener.exports[export_name] = export
        self.exports[export_name] = export
        if backend not in self._watched:
            self._watched.add(backend)
            backend.add_listener(self._on_change)
        log.info(
            "nbd: exporting %s as '%s' on %s%s%s",
            backend.name,
            export_name,
            listener.address,
            ", writable" if writable else "",
            f", {listener.tls}" if listener.tls.creds else "",
        )

    async def _listener_for(
        self,
        socket: str | None,
        host: str | None,
        port: str | None,
        permissions: int,
        asked_tls: tuple[str | None, bool | None, bool | None, str | None],
    ) -> Listener:
        """The listener an export goes on: the default server, or one of its own; with the
        TLS asked for (tls-creds, tls, tls-verify-peer, tls-authz; None: not said), which an
        existing listener must already have."""
        if socket is None and host is None and port is None:
            listener = self.default
            if listener is None:
                raise BlockError(
                    errno.EINVAL,
                    "no NBD server to export on: give socket=PATH "
                    "or host=H port=P, or mount with --nbd",
                )
            where = listener.address
        else:
            where = address(socket, host, port)
        listener = self.listeners.get(where)
        setting = (
            tls_setting(where, *asked_tls)
            if asked_tls != (None, None, None, None) or listener is None
            else listener.tls
        )
        if listener is None:
            listener = await self._listen(where, permissions, permanent=False, tls=setting)
        elif setting != listener.tls:
            raise BlockError(
                errno.EINVAL,
                f"{where} already serves exports {listener.tls}: an export there takes its "
                "TLS as it is",
            )
        return listener

    async def remove(self, name: str, force: bool) -> None:
        targets = (
            [self.exports[name]]
            if name in self.exports
            else [e for e in self.exports.values() if e.backend.name == name]
        )
        if not targets:
            raise BlockError(
                errno.ENOENT, f"no export named '{name}', and no export of a backend named '{name}'"
            )
        busy = [e for e in targets if any(not s.hung_up() for s in e.sessions)]
        if busy and not force:
            clients = ", ".join(s.peer for e in busy for s in e.sessions if not s.hung_up())
            raise BlockError(
                errno.EBUSY,
                f"export '{busy[0].name}' has clients ({clients}); force=on disconnects them",
            )
        for export in targets:
            self._retire(export, "export-del")
        sessions = [s for e in targets for s in e.sessions]
        for session in sessions:
            session.stop()
        for session in sessions:
            await session.finished.wait()

    def status(self) -> list[ExportStatus]:
        self.retired = {e for e in self.retired if e.sessions}
        return [e.status() for e in [*self.exports.values(), *self.retired]]

    def _retire(self, export: Export, why: str) -> None:
        """Offer ``export`` no more; a socket of its own closes with its last export."""
        del self.exports[export.name]
        listener = export.listener
        del listener.exports[export.name]
        export.retired = True
        release = self._releases.pop(export, None)
        if release is not None:
            release()
        if export.sessions:
            self.retired.add(export)
        if not listener.exports and not listener.permanent:
            listener.close()
            self.listeners.pop(listener.address, None)
        log.info(
            "nbd: export '%s' withdrawn (%s)%s",
            export.name,
            why,
            f"; its {len(export.sessions)} client(s) stay until they leave"
            if export.sessions
            else "",
        )

    def _on_change(self, backend: BlockBackend, event: str) -> None:
        if event == "delete":
            for export in [e for e in self.exports.values() if e.backend is backend]:
                self._retire(export, f"backend {backend.name} deleted")
