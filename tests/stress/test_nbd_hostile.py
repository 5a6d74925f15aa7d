"""Hostile NBD peers. A broken or malicious server (short replies, wrong cookies, oversized
lengths, chunks out of range, garbage anywhere) costs the nbd driver its connection and the
caller a clean EIO; a malicious client (oversized requests, requests past the end, unknown
commands and flags, garbage during negotiation, hundreds of connections) gets errors or is
hung up on. Either way the daemon lives and its other backends never notice. The fuzzing
runs a bounded number of rounds from fixed seeds."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blkfs import nbd
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.conftest import needs_fuse
from tests.helpers import Mount
from tests.nbdpeers import NbdClient, needs_nbd_tools

SIZE = 1 << 20
ROUNDS = 150
Misbehaviour = Callable[[nbd.Request], bytes]


class Offered(nbd.Catalog):
    def lookup(self, name: str) -> nbd.ExportInfo:
        return nbd.ExportInfo("disk0", SIZE, nbd.TransmissionFlag.SEND_FLUSH)


async def fake_server(
    path: Path,
    answer: Misbehaviour,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """An NBD server that negotiates properly, answers the first request with ``answer``'s
    bytes and hangs up (a server that crashed halfway through a reply); one connection at
    a time, forever."""
    with trio.socket.socket(socket.AF_UNIX) as listener:
        await listener.bind(str(path))
        listener.listen()
        task_status.started()
        while True:
            await _serve_one(listener, answer)


async def _serve_one(listener: trio.socket.SocketType, answer: Misbehaviour) -> None:
    sock, _ = await listener.accept()
    with sock:
        stream = trio.SocketStream(sock)
        handshake = nbd.ServerHandshake(Offered())
        buffered = bytearray()

        async def exactly(count: int) -> bytes:
            while len(buffered) < count:
                data = await stream.receive_some()
                if not data:
                    raise EOFError
                buffered.extend(data)
            taken = bytes(buffered[:count])
            del buffered[:count]
            return taken

        try:
            await stream.send_all(handshake.greeting())
            while not handshake.done:
                await stream.send_all(handshake.receive(await exactly(handshake.want())))
            request = nbd.parse_request(await exactly(nbd.REQUEST.size))
            await exactly(request.payload)
            await stream.send_all(answer(request))
        except (EOFError, trio.BrokenResourceError, nbd.ProtocolError):
            pass


def read_reply(chunks: Callable[[int, int, int], bytes]) -> Misbehaviour:
    """Answer reads with ``chunks(cookie, offset, length)``, everything else with success."""

    def answer(request: nbd.Request) -> bytes:
        if request.type == nbd.Cmd.READ:
            return chunks(request.cookie, request.offset, request.length)
        return nbd.simple_reply(request.cookie)

    return answer


BROKEN_SERVERS: dict[str, Misbehaviour] = {
    "short reply": read_reply(lambda c, o, n: nbd.offset_data(c, o, n, done=True)[:9]),
    "short data": read_reply(lambda c, o, n: nbd.offset_data(c, o, n, done=True) + b"x"),
    "wrong cookie": read_reply(lambda c, o, n: nbd.none_chunk(c + 1000)),
    "oversized length": read_reply(
        lambda c, o, n: nbd.chunk(
            c, nbd.ReplyType.OFFSET_DATA, struct.pack(">Q", o), length=1 << 31
        )
    ),
    "chunk past the read": read_reply(
        lambda c, o, n: nbd.offset_data(c, o + 1, n, done=True) + bytes(n)
    ),
    "chunk before the read": read_reply(
        lambda c, o, n: nbd.offset_hole(c, max(o - 4096, 0) if o else 2**63, n, done=True)
    ),
    "overlapping chunks": read_reply(
        lambda c, o, n: nbd.offset_hole(c, o, n, done=False) + nbd.offset_hole(c, o, n, done=True)
    ),
    "done too soon": read_reply(lambda c, o, n: nbd.offset_hole(c, o, n // 2, done=True)),
    "bad magic": read_reply(lambda c, o, n: b"\xde\xad\xbe\xef" * 8),
    "simple reply to a read": read_reply(lambda c, o, n: nbd.simple_reply(c) + bytes(n)),
    "hang up": read_reply(lambda c, o, n: b""),
}


@pytest.fixture
async def healthy(tmp_path: Path):
    """A layer with a healthy backend beside the broken ones, checked after each."""
    layer = BlockLayer()
    image = tmp_path / "good.img"
    image.write_bytes(os.urandom(SIZE))
    good = await layer.create("good", str(image))
    yield layer, lambda: good.read(0, SIZE), image.read_bytes()
    await layer.close()


@pytest.mark.parametrize("misbehaviour", list(BROKEN_SERVERS))
async def test_a_broken_server_costs_a_clean_eio(
    tmp_path: Path, healthy, misbehaviour: str
) -> None:
    layer, read_good, good_data = healthy
    path = tmp_path / "evil.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(fake_server, path, BROKEN_SERVERS[misbehaviour])
        backend = await layer.create("evil", f"nbd+unix:///disk0?socket={path}")
        with trio.fail_after(10), pytest.raises(BlockError) as failed:
            await backend.read(4096, 8192)
        assert failed.value.errno == errno.EIO
        with trio.fail_after(10), pytest.raises(BlockError):  # the node stays failed
            await backend.read(0, 512)
        assert await read_good() == good_data
        await layer.delete("evil", force=True)
        nursery.cancel_scope.cancel()


async def test_garbage_from_a_server_at_any_point(tmp_path: Path, healthy) -> None:
    layer, read_good, good_data = healthy
    rng = random.Random(16)
    failures = {errno.EIO: 0, errno.EPROTO: 0}
    for round_ in range(ROUNDS):
        path = tmp_path / f"g{round_}.sock"
        garbage = rng.randbytes(rng.randrange(1, 64))
        during_handshake = rng.random() < 0.3

        def answer(request: nbd.Request, garbage: bytes = garbage) -> bytes:
            return garbage

        async with trio.open_nursery() as nursery:
            if during_handshake:

                async def serve_garbage(
                    *,
                    task_status: trio.TaskStatus[None],
                    path: Path = path,
                    garbage: bytes = garbage,
                ) -> None:
                    with trio.socket.socket(socket.AF_UNIX) as listener:
                        await listener.bind(str(path))
                        listener.listen()
                        task_status.started()
                        sock, _ = await listener.accept()
                    with sock:
                        await sock.send(
                            nbd.GREETING.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 1)[: rng.randrange(19)]
                            + garbage
                        )

                await nursery.start(serve_garbage)
            else:
                await nursery.start(fake_server, path, answer)
            try:
                with trio.fail_after(10):
                    backend = await layer.create("evil", f"nbd+unix:///x?socket={path}")
                    try:
                        await backend.read(0, 4096)
                    finally:
                        await layer.delete("evil", force=True)
            except BlockError as exc:
                failures[exc.errno] = failures.get(exc.errno, 0) + 1
            nursery.cancel_scope.cancel()
    assert await read_good() == good_data
    assert sum(failures.values()) == ROUNDS and set(failures) <= {
        errno.EIO,
        errno.EPROTO,
        errno.ECONNRESET,
        errno.EPIPE,  # the server hung up while the client was sending an option
        errno.ENOENT,
    }, failures


# -- a malicious client against a real daemon -------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, mount_factory) -> tuple[Mount, Path, bytes]:
    disk, other = tmp_path / "disk.img", tmp_path / "other.img"
    disk.write_bytes(os.urandom(SIZE))
    data = os.urandom(SIZE)
    other.write_bytes(data)
    sock = tmp_path / "nbd.sock"
    mount = mount_factory(
        "--backend",
        f"d=driver=raw,file.driver=file,file.filename={disk}",
        "--backend",
        f"other={other}",
        "--nbd",
        f"unix:{sock}",
        "--export",
        "d writable=on",
    )
    return mount, sock, data


def unaffected(mount: Mount, sock: Path, data: bytes) -> None:
    """The daemon lives, the other backend reads right, the export serves a new client, and
    the log shows no internal error."""
    assert mount.alive()
    assert "Traceback" not in mount.log.read_text()
    assert (mount / "other").read_bytes() == data
    client = NbdClient(sock, "d")
    try:
        assert len(client.read(0, 4096)) == 4096
    finally:
        client.close()


@pytest.mark.fuse
@needs_fuse
@needs_nbd_tools
def test_bad_requests_get_errors_and_the_connection_goes_on(daemon) -> None:
    mount, sock, data = daemon
    client = NbdClient(sock, "d")
    try:
        big = 64 << 20
        cases = [
            (nbd.Cmd.READ, 0, big, nbd.NO_FLAGS, b"", errno.EINVAL),
            (nbd.Cmd.WRITE, 0, (32 << 20) + 1, nbd.NO_FLAGS, bytes((32 << 20) + 1), errno.EINVAL),
            (nbd.Cmd.READ, SIZE - 10, 20, nbd.NO_FLAGS, b"", errno.EINVAL),
            (nbd.Cmd.WRITE, SIZE - 10, 20, nbd.NO_FLAGS, bytes(20), errno.ENOSPC),
            (nbd.Cmd.WRITE_ZEROES, SIZE, 1, nbd.NO_FLAGS, b"", errno.ENOSPC),
            (nbd.Cmd.TRIM, 2**63, 1, nbd.NO_FLAGS, b"", errno.EINVAL),
            (nbd.Cmd.BLOCK_STATUS, 0, 0, nbd.CmdFlag.REQ_ONE, b"", errno.EINVAL),
        ]
        for kind, offset, length, flags, payload, code in cases:
            error, message = raw_request(client, kind, offset, length, flags, payload)
            assert error == code and message, (kind, offset, length)
        for kind, flags in (
            (99, 0),
            (nbd.Cmd.CACHE, 0),
            (nbd.Cmd.READ, 0x4000),
            (nbd.Cmd.WRITE, nbd.CmdFlag.NO_HOLE),
        ):
            assert raw_request(client, kind, 0, 0, flags, b"")[0] == errno.EINVAL
        assert len(client.read(0, SIZE)) == SIZE  # the same connection still serves
    finally:
        client.close()
    unaffected(mount, sock, data)


def raw_request(
    client: NbdClient, kind: int, offset: int, length: int, flags: int, payload: bytes
) -> tuple[int, str]:
    """Send a request whatever it says (a well-behaved client's checks would stop it), then
    read its reply to the end; its error and message."""
    cookie = 0xC0FFEE
    client.sock.sendall(nbd.Request(flags, kind, cookie, offset, length).pack() + payload)
    error, message = 0, ""
    while True:
        magic = client.exactly(4)
        if magic == struct.pack(">I", nbd.SIMPLE_REPLY_MAGIC):
            _, error, replied = nbd.SIMPLE_REPLY.unpack(magic + client.exactly(12))
            assert replied == cookie
            return error, message
        _, reply_flags, reply_type, replied, size = nbd.CHUNK.unpack(magic + client.exactly(16))
        assert replied == cookie
        body = client.exactly(size)
        if reply_type & nbd.REPLY_TYPE_ERROR:
            error, count = nbd.ERROR.unpack_from(body)
            message = body[nbd.ERROR.size : nbd.ERROR.size + count].decode()
        if reply_flags & nbd.ReplyFlag.DONE:
            return error, message


@pytest.mark.fuse
@needs_fuse
@needs_nbd_tools
def test_garbage_during_negotiation_and_in_requests(daemon) -> None:
    mount, sock, data = daemon
    rng = random.Random(7)
    for round_ in range(ROUNDS):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.recv(nbd.GREETING.size)
            if round_ % 2:  # past the flags, into the options
                s.sendall(
                    nbd.CLIENT_FLAGS.pack(1)
                    + nbd.option(rng.choice(list(nbd.Opt)), rng.randbytes(20))
                )
            try:
                s.sendall(rng.randbytes(rng.randrange(1, 300)))
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # hung up on: fine
    for round_ in range(ROUNDS // 3):
        client = NbdClient(sock, "d")
        try:
            kind = rng.choice([*nbd.Cmd, 8, 99])
            offset = rng.choice([0, 1, SIZE - 1, SIZE, 2**63, 2**64 - 1])
            length = rng.choice(
                [0, 1, 512, 65536] + ([] if kind == nbd.Cmd.WRITE else [SIZE, 2**32 - 1])
            )
            flags = rng.randrange(1 << 16) if round_ % 3 else 0
            payload = bytes(length) if kind == nbd.Cmd.WRITE else b""
            if kind == nbd.Cmd.DISC:
                continue
            try:
                raw_request(client, kind, offset, length, flags, payload)
            except (nbd.ProtocolError, EOFError, OSError):
                pass
        finally:
            client.close()
    unaffected(mount, sock, data)


@pytest.mark.fuse
@needs_fuse
@needs_nbd_tools
def test_hundreds_of_connections(daemon) -> None:
    mount, sock, data = daemon
    idle = []
    try:
        for _ in range(300):  # more than one socket serves at once: the rest are closed
            idle.append(socket.socket(socket.AF_UNIX))
            idle[-1].connect(str(sock))  # blocking: waits while the backlog is full
        assert (mount / "other").read_bytes() == data
        assert mount.alive()
    finally:
        for s in idle:
            s.close()
    unaffected(mount, sock, data)
