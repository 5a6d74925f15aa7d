"""The QMP frontend: qemu-storage-daemon's monitor protocol on a unix socket, so that
``qemu.qmp``, ``qmp-shell`` and orchestration tools drive blkfs unchanged.

Ground rules: the socket is mode 0600 before anyone can connect; each client gets the
greeting, must negotiate with ``qmp_capabilities``, then runs its commands one at a time
(several clients at once); every command is a translation (:mod:`.translate`) onto the
command layer. Bad input (not JSON, too large, not a command) gets QEMU's error reply and
the client may go on; a client that leaves mid-command lets the command finish. Events go
to every negotiated client, with a timestamp; a client too slow to take them is dropped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import trio

from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.qmp.stream import ParseError, Splitter
from blkfs.frontends.qmp.translate import (
    PACKAGE,
    VERSION,
    QmpError,
    execute,
    io_error_event,
    job_event,
)
from blkfs.frontends.unix_socket import clear_stale_socket
from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.qmp")

MAX_CLIENTS = 16
"""Monitor connections served at once; more are closed as they come."""
EVENT_BACKLOG = 1024
"""Messages queued for one client; one that falls further behind is disconnected."""
TOP_KEYS = frozenset({"execute", "arguments", "id"})


def parse_address(text: str) -> str:
    """The socket path of ``unix:PATH`` or QEMU's chardev spelling ``socket,path=PATH[,...]``
    (``server=on``, ``wait=off`` and ``id=`` are accepted and implied)."""
    if text.startswith("unix:") and len(text) > 5:
        return text[5:]
    if text.startswith("socket,"):
        fields = dict(item.partition("=")[::2] for item in text.split(",")[1:])
        extra = set(fields) - {"path", "server", "wait", "id"}
        if (
            "path" in fields
            and fields["path"]
            and not extra
            and fields.get("server", "on") == "on"
            and fields.get("wait", "off") == "off"
        ):
            return fields["path"]
    raise BlockError(
        errno.EINVAL,
        f"QMP address '{text}': expected unix:PATH or socket,path=PATH[,server=on,wait=off]",
    )


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


class Client:
    """One monitor connection: its queue of outgoing messages and its negotiation."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.negotiated = False
        self.send, self.outgoing = trio.open_memory_channel[tuple[bytes, bool]](EVENT_BACKLOG)

    def post(self, message: Mapping[str, Any], then_stop: bool = False) -> bool:
        """Queue a message (``then_stop``: the reply to quit, after which the daemon stops);
        False if the client has fallen too far behind."""
        try:
            self.send.send_nowait((json.dumps(message).encode() + b"\r\n", then_stop))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True


class QmpFrontend:
    """The daemon's QMP monitor socket and its clients."""

    name = "qmp"

    def __init__(
        self, layer: BlockLayer, commands: Commands, path: str, mountpoint: str | None = None
    ) -> None:
        self.layer = layer
        self.commands = commands
        self.path = path
        self.mountpoint = mountpoint
        """Where the daemon's backend files are (fuse exports are files there)."""
        self.clients: set[Client] = set()
        self._stopping = trio.Event()
        self._one_at_a_time = trio.Lock()
        """Commands of all clients run one after the other, as QEMU's monitor runs them: a
        translation that looks at a device and then changes it (block_set_io_throttle)
        sees no other client's change in between."""

    # -- translate.Monitor ------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, Any]) -> None:
        message = {"event": event, "data": dict(data), "timestamp": timestamp()}
        for client in list(self.clients):
            if client.negotiated and not client.post(message):
                log.warning(
                    "qmp: a client fell %d messages behind; disconnecting it", EVENT_BACKLOG
                )
                client.send.close()

    # -- daemon.Frontend --------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listener = await self._listen()
        unwatch = self.commands.watch_jobs(
            lambda event, job: self.emit(event, job_event(event, job))
        )
        unwatch_errors = self.layer.watch_io_errors(
            lambda error: self.emit("BLOCK_IO_ERROR", io_error_event(error))
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._client, [listener])
                task_status.started()
                log.info("qmp: listening on %s", self.path)
                await self._stopping.wait()
                nursery.cancel_scope.cancel()
        finally:
            unwatch()
            unwatch_errors()
            listener.socket.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Nothing is left once :meth:`serve` has returned."""

    async def _listen(self) -> trio.SocketListener:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await clear_stale_socket(self.path)
            await sock.bind(self.path)
            os.chmod(self.path, 0o600)  # before listen(): until then nobody can connect
            sock.listen(16)
        except OSError as exc:
            sock.close()
            code = exc.errno or errno.EIO
            raise BlockError(
                code, f"cannot listen for QMP on {self.path}: {os.strerror(code)}"
            ) from None
        return trio.SocketListener(sock)

    # -- one client -------------------------------------------------------------------------

    async def _client(self, stream: trio.SocketStream) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            log.warning("qmp: already %d clients; refusing one more", MAX_CLIENTS)
            await trio.aclose_forcefully(stream)
            return
        client = Client(stream)
        self.clients.add(client)
        major, minor, micro = VERSION
        client.post(
            {
                "QMP": {
                    "version": {
                        "qemu": {"major": major, "minor": minor, "micro": micro},
                        "package": PACKAGE,
                    },
                    "capabilities": [],
                }
            }
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, client, nursery.cancel_scope)
                await self._read(client)
                client.send.close()
        except Exception:  # a bug: this client goes, the daemon and the others stay
            log.exception("qmp: a client failed")
        finally:
            self.clients.discard(client)
            await trio.aclose_forcefully(stream)

    async def _write(self, client: Client, scope: trio.CancelScope) -> None:
        try:
            async for data, then_stop in client.outgoing:
                await client.stream.send_all(data)
                if then_stop:
                    self.stop()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # the client is gone or dropped: stop reading it too

    async def _read(self, client: Client) -> None:
        splitter = Splitter()
        while True:
            try:
                data = await client.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for message in splitter.feed(data):
                reply = await self._dispatch(client, message)
                quit_ = "return" in reply and message["execute"] == "quit"
                if not client.post(reply, then_stop=quit_):
                    return

    async def _dispatch(self, client: Client, message: Any) -> dict[str, Any]:
        """The reply to one message; a command runs to its end even if the client leaves
        meanwhile (a half-done command would change something)."""
        if isinstance(message, ParseError):
            return _error(QmpError("GenericError", message.desc))
        if not isinstance(message, dict):
            return _error(QmpError("GenericError", "QMP input must be a JSON object"))
        reply: dict[str, Any]
        with trio.CancelScope(shield=True):
            try:
                reply = {"return": await self._command(client, message)}
            except QmpError as exc:
                reply = _error(exc)
            except Exception:  # a bug: say so; the client and the daemon go on
                log.exception("qmp: command %r failed", message.get("execute"))
                reply = _error(
                    QmpError("GenericError", "internal error (a bug in blkfs; see its log)")
                )
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    async def _command(self, client: Client, message: dict[str, Any]) -> Any:
        if "execute" not in message:
            raise QmpError("GenericError", "QMP input lacks member 'execute'")
        unknown = sorted(set(message) - TOP_KEYS)
        if unknown:
            raise QmpError("GenericError", f"QMP input member '{unknown[0]}' is unexpected")
        name, args = message["execute"], message.get("arguments", {})
        if not isinstance(name, str):
            raise QmpError("GenericError", "QMP input member 'execute' must be a string")
        if not isinstance(args, dict):
            raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            if client.negotiated:
                raise QmpError(
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                )
            enable = args.get("enable", [])
            if set(args) - {"enable"} or not isinstance(enable, list):
                raise QmpError("GenericError", "qmp_capabilities takes only enable=[...]")
            if enable:
                raise QmpError("GenericError", f"Capability '{enable[0]}' not available")
            client.negotiated = True
            return {}
        if not client.negotiated:
            raise QmpError(
                "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if name == "quit":  # the daemon stops once the reply is out
            if args:
                raise QmpError("GenericError", f"Parameter '{next(iter(args))}' is unexpected")
            return {}
        async with self._one_at_a_time:
            return await execute(self, name, args)


def _error(exc: QmpError) -> dict[str, Any]:
    return {"error": {"class": exc.klass, "desc": exc.desc}}
