"""NBD peers for the tests: qemu-nbd and nbdkit on a unix socket, always stopped afterwards;
and block status as ``nbdinfo --map`` and ``qemu-img map`` say it, in one shape."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from blkfs import nbd
from tests.conftest import NBD_TOOLS
from tests.helpers import wait_until

needs_nbd_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", *NBD_TOOLS)),
    reason="qemu-nbd, nbdkit or libnbd's tools are missing (run scripts/setup)",
)
"""Under CI=true their absence fails the run (tests/conftest.py CI_TOOLS); a test that uses this
carries the ``qemu`` or ``fuse`` marker, so it cannot skip green in CI either."""


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class Server:
    """A running NBD server process; :meth:`kill` and :meth:`restart` for outage tests."""

    def __init__(self, args: list[str], sock: Path) -> None:
        self.args, self.socket = args, sock
        self.log = sock.with_name(sock.name + ".log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk0?socket={self.socket}"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        process = self.process
        wait_until(
            lambda: listening(self.socket) or process.poll() is not None,
            f"{self.args[0]} to listen",
        )
        assert process.poll() is None, self.log.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


@contextmanager
def serving(args: list[str], sock: Path) -> Iterator[Server]:
    server = Server(args, sock)
    server.start()
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)


def qemu_nbd(image: Path, fmt: str, sock: Path, *extra: str) -> AbstractContextManager[Server]:
    """qemu-nbd serving ``image`` as export ``disk0``, to up to 16 clients at once."""
    return serving(
        [
            "qemu-nbd",
            "-f",
            fmt,
            "-k",
            str(sock),
            "-x",
            "disk0",
            "-t",
            "-e",
            "16",
            *extra,
            str(image),
        ],
        sock,
    )


def nbdkit(sock: Path, *args: str) -> AbstractContextManager[Server]:
    """nbdkit with a plugin and its arguments (filters first, as ``--filter=NAME``)."""
    return serving(["nbdkit", "-f", "-U", str(sock), "-e", "disk0", *args], sock)


Extents = list[tuple[int, int, bool, bool]]
"""``(offset, length, data, zero)``, adjacent runs of one kind merged."""


def _merged(runs: list[tuple[int, int, bool, bool]]) -> Extents:
    out: Extents = []
    for offset, length, data, zero in runs:
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        else:
            out.append((offset, length, data, zero))
    return out


def nbd_map(uri: str) -> Extents:
    """``nbdinfo --map``: data is not NBD_STATE_HOLE, zero is NBD_STATE_ZERO."""
    out = subprocess.run(
        ["nbdinfo", "--map", "--json", uri], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return _merged(
        [
            (e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2))
            for e in json.loads(out)
        ]
    )


def qemu_map(image: Path, fmt: str) -> Extents:
    """``qemu-img map`` of an image (opened with -U: blkfs or a server may hold it)."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", "-f", fmt, str(image)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return _merged([(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)])


class NbdClient:
    """A blocking NBD client made of :mod:`blkfs.nbd`'s sans-IO parts, for tests that hold a
    connection open across a media change or a delete, or need a raw socket to misbehave on.
    One request at a time."""

    def __init__(self, sock: Path, export: str = "", structured: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        try:
            self.sock.connect(str(sock))
            handshake = nbd.ClientHandshake(export, structured=structured)
            while not handshake.done:
                self.sock.sendall(handshake.receive(self.exactly(handshake.want())))
        except BaseException:
            self.sock.close()
            raise
        assert handshake.result is not None
        self.negotiated = handshake.result
        self.transmission = nbd.ClientTransmission(handshake.result)

    def exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            piece = self.sock.recv(count - len(data))
            if not piece:
                raise EOFError("the server hung up")
            data += piece
        return data

    def request(
        self,
        kind: nbd.Cmd,
        offset: int = 0,
        length: int = 0,
        flags: nbd.CmdFlag = nbd.NO_FLAGS,
        data: bytes = b"",
        buf: memoryview | None = None,
    ) -> nbd.Reply:
        _, header = self.transmission.request(kind, offset, length, flags, buf)
        self.sock.sendall(header + data)
        while True:
            magic = self.exactly(4)
            header = magic + self.exactly(self.transmission.header_size(magic) - 4)
            into = self.transmission.payload(self.exactly(self.transmission.header(header)))
            if into is not None:
                into[:] = self.exactly(into.nbytes)
            reply = self.transmission.end()
            if reply is not None:
                return reply

    def read(self, offset: int, length: int) -> bytes:
        buf = memoryview(bytearray(length))
        reply = self.request(nbd.Cmd.READ, offset, length, buf=buf)
        if reply.error:
            raise OSError(reply.error, reply.message)
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.sendall(self.transmission.request(nbd.Cmd.DISC)[1])
        except OSError:
            pass
        self.sock.close()
