"""NBD over TLS: NBD_OPT_STARTTLS in both handshakes as plain values, then blkfs's export
and driver against each other over real sockets with certificates made by openssl (who is
refused and how), and clients that misbehave around STARTTLS: each gets a clean refusal or
hang-up, and the export goes on serving."""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkfs import nbd
from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.nbd import NbdFrontend
from blkfs.layer import BlockLayer
from blkfs.nbd import ClientHandshake, Opt, ProtocolError, Refused, Rep, ServerHandshake
from tests.tls import client_of_another_ca, make_credentials
from tests.unit.test_nbd_protocol import Two, converse

MiB = 1 << 20


def replies(wire: bytes) -> list[tuple[int, int]]:
    """``(option, reply)`` of every option reply in ``wire``."""
    out, at = [], 0
    while at < len(wire):
        _, opt, reply, length = nbd.OPTION_REPLY.unpack_from(wire, at)
        out.append((opt, reply))
        at += nbd.OPTION_REPLY.size + length
    return out


def feed(server: ServerHandshake, wire: bytes) -> bytes:
    """Everything the server answers to ``wire``, read as its loop reads."""
    out, at = b"", 0
    while not server.done and not server.upgrade and at + server.want() <= len(wire):
        chunk = wire[at : at + server.want()]
        at += len(chunk)
        out += server.receive(chunk)
    return out


FLAGS = nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.C_FIXED_NEWSTYLE)


def test_a_server_that_requires_tls_refuses_every_option_before_it() -> None:
    server = ServerHandshake(Two(), tls=True)
    server.greeting()
    wire = FLAGS + b"".join(
        nbd.option(opt, data)
        for opt, data in [
            (Opt.LIST, b""),
            (Opt.STRUCTURED_REPLY, b""),
            (Opt.GO, nbd.info_request("disk0", [])),
            (Opt.INFO, nbd.info_request("disk0", [])),
            (Opt.SET_META_CONTEXT, nbd.meta_context_request("disk0", [nbd.BASE_ALLOCATION])),
        ]
    )
    assert {reply for _, reply in replies(feed(server, wire))} == {Rep.ERR_TLS_REQD}
    assert not server.done and not server.secure
    with pytest.raises(ProtocolError):  # the option that cannot be refused: hang up
        feed(server, nbd.option(Opt.EXPORT_NAME, b"disk0"))


def test_starttls_then_the_negotiation_starts_over_inside_tls() -> None:
    client, server = ClientHandshake("disk0", tls=True), ServerHandshake(Two(), tls=True)
    ack = feed(server, client.receive(server.greeting()))
    assert replies(ack) == [(Opt.STARTTLS, Rep.ACK)] and server.upgrade
    assert client.receive(ack) == b"" and client.upgrade and not client.done
    for side in (client, server):  # nothing is read until the TLS handshake is done
        with pytest.raises(ValueError):
            side.receive(b"")
    assert server.secured() == b""
    to_client = bytearray(feed(server, client.secured()))
    assert server.secure and not client.upgrade
    while not client.done:
        data = bytes(to_client[: client.want()])
        del to_client[: len(data)]
        to_client += feed(server, client.receive(data))
    assert client.result is not None and server.result is not None
    assert client.result.structured and client.result.export.name == "disk0"


def test_structured_replies_agreed_before_tls_are_forgotten() -> None:
    server = ServerHandshake(Two(), tls=False)
    server.greeting()
    feed(server, FLAGS + nbd.option(Opt.STRUCTURED_REPLY))
    secure = ServerHandshake(Two(), tls=True)
    secure.greeting()
    out = feed(secure, FLAGS + nbd.option(Opt.STRUCTURED_REPLY) + nbd.option(Opt.STARTTLS))
    assert replies(out) == [(Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD), (Opt.STARTTLS, Rep.ACK)]
    secure.secured()
    out = feed(secure, nbd.option(Opt.GO, nbd.info_request("disk0", [])))
    assert secure.result is not None and not secure.result.structured


@pytest.mark.parametrize(
    "tls, wire, expected",
    [
        (False, nbd.option(Opt.STARTTLS), Rep.ERR_POLICY),  # a server without credentials
        (True, nbd.option(Opt.STARTTLS, b"x"), Rep.ERR_INVALID),  # STARTTLS takes no data
    ],
)
def test_starttls_refused_changes_nothing(tls: bool, wire: bytes, expected: Rep) -> None:
    server = ServerHandshake(Two(), tls=tls)
    server.greeting()
    assert replies(feed(server, FLAGS + wire)) == [(Opt.STARTTLS, expected)]
    assert not server.upgrade and not server.secure


def test_starttls_twice_is_invalid() -> None:
    server = ServerHandshake(Two(), tls=True)
    server.greeting()
    feed(server, FLAGS + nbd.option(Opt.STARTTLS))
    server.secured()
    assert replies(feed(server, nbd.option(Opt.STARTTLS))) == [(Opt.STARTTLS, Rep.ERR_INVALID)]
    assert server.secure and not server.upgrade


def test_a_client_is_told_why_the_server_refuses() -> None:
    with pytest.raises(Refused, match="does not do TLS"):
        converse(ClientHandshake("disk0", tls=True), ServerHandshake(Two()))
    with pytest.raises(Refused, match="requires TLS") as plain:
        converse(ClientHandshake("disk0"), ServerHandshake(Two(), tls=True))
    assert plain.value.reply == Rep.ERR_TLS_REQD


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from([*Opt, 0, 99]), st.binary(max_size=32)), max_size=8))
def test_options_to_a_tls_server_get_replies_or_a_hang_up(options) -> None:
    server = ServerHandshake(Two(), tls=True)
    server.greeting()
    try:
        out = feed(server, FLAGS + b"".join(nbd.option(opt, data) for opt, data in options))
    except ProtocolError:
        return  # NBD_OPT_EXPORT_NAME before TLS
    assert server.upgrade or not server.done or server.aborted
    assert all(
        reply == Rep.ACK or opt in (Opt.STARTTLS, Opt.ABORT) or reply == Rep.ERR_TLS_REQD
        for opt, reply in replies(out)
    )


# -- over sockets -------------------------------------------------------------------------


@pytest.fixture
async def tls_export(
    tmp_path: Path, credentials: Path
) -> AsyncIterator[tuple[BlockLayer, Commands, NbdFrontend, Path]]:
    """Backend d (1 MiB of random data) exported writable on a unix socket that requires
    TLS and a client certificate signed by the credentials' CA."""
    image = tmp_path / "d.img"
    image.write_bytes(os.urandom(MiB))
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "d", "medium": str(image)})
    frontend = NbdFrontend(layer, commands)
    commands.exporter = frontend
    sock = tmp_path / "tls.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.serve)
        await commands.run(
            "export",
            {
                "name": "d",
                "socket": str(sock),
                "writable": "on",
                "tls-creds": str(credentials),
                "tls-verify-peer": "on",
            },
        )
        yield layer, commands, frontend, sock
        frontend.stop()
    await layer.close()


async def still_serves(layer: BlockLayer, sock: Path, credentials: Path) -> None:
    remote = await layer.create(
        "check", f"nbds+unix:///d?socket={sock},tls-creds={credentials},read-only=on"
    )
    assert await remote.read(0, MiB) == await layer.find("d").read(0, MiB)
    await layer.delete("check")


async def test_who_the_export_refuses(tls_export, tmp_path: Path, credentials: Path) -> None:
    layer, _, frontend, sock = tls_export
    plain = f"nbd+unix:///d?socket={sock},read-only=on"
    bare = tmp_path / "bare"  # trusts the CA, has no certificate of its own
    bare.mkdir()
    (bare / "ca-cert.pem").write_bytes((credentials / "ca-cert.pem").read_bytes())
    rogue = client_of_another_ca(tmp_path / "rogue", credentials)
    stranger = make_credentials(tmp_path / "stranger")  # a CA that signed no one here
    for options, code, says in [
        ("", errno.EACCES, "requires TLS"),
        # TLS 1.3 checks the client's certificate after the client's handshake is done:
        # the client sees an alert or just the connection closing, which ever comes first
        (f",tls-creds={bare}", errno.EACCES, "TLS"),
        (f",tls-creds={rogue}", errno.EACCES, "TLS"),
        (f",tls-creds={stranger}", errno.EACCES, "CERTIFICATE_VERIFY_FAILED"),
        (f",tls-creds={credentials},tls-hostname=elsewhere", errno.EACCES, "TLS failed"),
        (",tls-hostname=localhost", errno.EINVAL, "needs tls-creds"),
        (",tls-creds=relative", errno.EINVAL, "absolute"),
        (f",tls-creds={tmp_path / 'nosuch'}", errno.EINVAL, "not a directory"),
    ]:
        with pytest.raises(BlockError) as refused:
            await layer.create("r", plain + options)
        assert (refused.value.errno, says in refused.value.message) == (code, True), options
    assert frontend.status()[0]["stats"]["connections"] == 0
    await still_serves(layer, sock, credentials)
    with pytest.raises(BlockError, match="tls-creds"):
        await layer.create("r", f"nbds+unix:///d?socket={sock}")


async def test_a_server_without_tls_refuses_a_client_that_asks(
    tls_export, tmp_path: Path, credentials: Path
) -> None:
    layer, commands, _, _ = tls_export
    sock = tmp_path / "plain.sock"
    await commands.run("export", {"name": "d", "export-name": "p", "socket": str(sock)})
    with pytest.raises(BlockError, match="does not do TLS") as refused:
        await layer.create("r", f"nbds+unix:///p?socket={sock},tls-creds={credentials}")
    assert refused.value.errno == errno.EACCES


async def raw_client(sock: Path) -> trio.SocketStream:
    stream = await trio.open_unix_socket(str(sock))
    greeting = b""
    while len(greeting) < nbd.GREETING.size:
        greeting += await stream.receive_some(nbd.GREETING.size - len(greeting))
    return stream


async def hung_up(stream: trio.SocketStream) -> bool:
    """Whether the server closes the connection (reading and dropping what it sends)."""
    with trio.fail_after(10):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)
    return True


async def test_misbehaving_clients_around_starttls(
    tls_export, credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, _, _, sock = tls_export
    monkeypatch.setattr("blkfs.frontends.nbd.session.HANDSHAKE_TIMEOUT", 1.0)
    starttls = FLAGS + nbd.option(Opt.STARTTLS)
    ack = nbd.OPTION_REPLY.size
    # garbage where the options go
    stream = await raw_client(sock)
    await stream.send_all(FLAGS + b"\xff" * 64)
    assert await hung_up(stream)
    # STARTTLS, then a TLS handshake that never comes: the handshake timeout ends it
    stream = await raw_client(sock)
    await stream.send_all(starttls)
    assert len(await stream.receive_some(ack)) == ack
    assert await hung_up(stream)
    # STARTTLS twice in a row, the second before the TLS handshake: hung up on
    stream = await raw_client(sock)
    await stream.send_all(starttls + nbd.option(Opt.STARTTLS))
    assert await hung_up(stream)
    # plaintext where the TLS handshake should be
    stream = await raw_client(sock)
    await stream.send_all(starttls)
    await stream.receive_some(ack)
    await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
    assert await hung_up(stream)
    # STARTTLS again inside TLS: NBD_REP_ERR_INVALID, and the negotiation goes on
    stream = await raw_client(sock)
    await stream.send_all(starttls)
    await stream.receive_some(ack)
    context = ssl.create_default_context(cafile=str(credentials / "ca-cert.pem"))
    context.load_cert_chain(credentials / "client-cert.pem", credentials / "client-key.pem")
    secure = trio.SSLStream(stream, context, server_hostname="localhost")
    await secure.send_all(nbd.option(Opt.STARTTLS) + nbd.option(Opt.ABORT))
    answer = b""
    while len(answer) < 2 * ack:
        answer += await secure.receive_some(4096)
    assert replies(answer) == [(Opt.STARTTLS, Rep.ERR_INVALID), (Opt.ABORT, Rep.ACK)]
    await trio.aclose_forcefully(secure)
    await still_serves(layer, sock, credentials)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=200), st.booleans())
def test_garbage_before_or_instead_of_tls_never_harms_the_export(
    tmp_path: Path, credentials: Path, garbage: bytes, after_starttls: bool
) -> None:
    async def main() -> None:
        layer = BlockLayer()
        commands = Commands(layer)
        await commands.run("create", {"name": "d", "medium": "driver=null,size=1M"})
        frontend = NbdFrontend(layer, commands)
        commands.exporter = frontend
        sock = tmp_path / "fuzz.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            await commands.run(
                "export", {"name": "d", "socket": str(sock), "tls-creds": str(credentials)}
            )
            stream = await raw_client(sock)
            prefix = FLAGS + nbd.option(Opt.STARTTLS) if after_starttls else FLAGS
            try:
                await stream.send_all(prefix + garbage)
                await stream.send_eof()
                assert await hung_up(stream)
            except trio.BrokenResourceError:
                pass  # hung up on while sending
            remote = await layer.create(
                "r", f"nbds+unix:///d?socket={sock},tls-creds={credentials},read-only=on"
            )
            assert remote.length() == MiB
            await layer.delete("r")
            frontend.stop()
        await layer.close()

    trio.run(main)
