"""The NBD frontend and the nbd driver against each other in one process: blkfs exporting to
blkfs over a unix socket and TCP loopback; the export commands, the address and URI
spellings, and the config that makes the frontend."""

from __future__ import annotations

import argparse
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from blkfs.block.options import nbd_uri, parse_options
from blkfs.cli.errors import UsageError
from blkfs.cli.main import parser
from blkfs.cli.mount_config import build_config
from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.ctl import format_exports
from blkfs.frontends.nbd import NbdFrontend
from blkfs.frontends.nbd.export import parse_address
from blkfs.layer import BlockLayer
from blkfs.nbd import Address
from tests.helpers import without_stats

MiB = 1 << 20


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[BlockLayer, Commands, NbdFrontend]]:
    """A layer with backend d (4 MiB: 1 MiB of data, then a hole) and the NBD frontend."""
    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(4 * MiB)
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "d", "medium": str(image)})
    frontend = NbdFrontend(layer, commands)
    commands.exporter = frontend
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.serve)
        yield layer, commands, frontend
        frontend.stop()
    await layer.close()


@pytest.mark.parametrize("where", ["unix", "tcp", "unix+tls", "tcp+tls"])
async def test_blkfs_reads_and_writes_blkfs(
    served, tmp_path: Path, credentials: Path, where: str
) -> None:
    layer, commands, frontend = served
    tls = where.endswith("+tls")
    scheme = "nbds" if tls else "nbd"
    if where.startswith("unix"):
        args = {"socket": str(tmp_path / "s")}
    else:
        args = {"host": "127.0.0.1", "port": "0", "tls": "off"}  # plaintext TCP: said so
    if tls:
        args = {k: v for k, v in args.items() if k != "tls"} | {"tls-creds": str(credentials)}
    await commands.run("export", {"name": "d", "writable": "on", **args})
    where_ = frontend.exports["d"].listener.address
    uri = (
        f"{scheme}+unix:///d?socket={where_.path}" if where_.path else f"{scheme}://{where_}/d"
    ) + (f",tls-creds={credentials}" if tls else "")
    local = layer.find("d")
    remote = await layer.create("r", uri)
    assert remote.length() == 4 * MiB
    assert await remote.read(0, 4 * MiB) == await local.read(0, 4 * MiB)
    for offset in (0, MiB - 100, MiB, 3 * MiB):
        assert await remote.block_status(offset, 4 * MiB - offset) == await local.block_status(
            offset, 4 * MiB - offset
        )
    await remote.write(MiB + 5, b"over the wire", fua=True)
    await remote.write_zeroes(100, 1000, unmap=True)
    await remote.discard(2 * MiB, MiB)
    await remote.flush()
    assert await local.read(MiB + 5, 13) == b"over the wire"
    assert await local.read(100, 1000) == bytes(1000)
    async with trio.open_nursery() as nursery:  # many requests in flight on one connection
        for i in range(100):
            nursery.start_soon(remote.read, i * 4096, 65536)
    export = frontend.status()[0]
    assert len(export["clients"]) == 1 and export["stats"]["read_ops"] >= 100
    assert export["tls"] == export["clients"][0]["tls"] == tls
    await layer.delete("r")
    with trio.fail_after(5):
        while frontend.status()[0]["clients"]:
            await trio.sleep(0.01)
    assert local.open_count == 0


async def test_read_only_exports_and_sockets_private_by_default(served, tmp_path) -> None:
    layer, commands, _ = served
    sock = tmp_path / "ro"
    await commands.run("export", {"name": "d", "socket": str(sock)})
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with pytest.raises(BlockError) as refused:
        await layer.create("r", f"nbd+unix:///d?socket={sock}")
    assert refused.value.errno == errno.EROFS
    remote = await layer.create("r", f"nbd+unix:///d?socket={sock},read-only=on")
    assert layer.find("d").writers == 0
    with pytest.raises(BlockError) as write:
        await remote.write(0, b"x")
    assert write.value.errno == errno.EROFS


async def test_a_failed_export_command_changes_nothing(
    served, tmp_path: Path, credentials: Path
) -> None:
    _, commands, _ = served
    await commands.run("export", {"name": "d", "socket": str(tmp_path / "s")})
    psk = tmp_path / "psk"
    psk.mkdir()
    (psk / "keys.psk").write_text("qemu:0123456789abcdef\n")
    before = without_stats(await commands.run("query-status", {}))
    tcp = {"name": "d", "export-name": "x", "host": "127.0.0.1", "port": "0"}
    unix = {"name": "d", "export-name": "x", "socket": str(tmp_path / "u")}
    for args, code in [
        ({"name": "nosuch"}, errno.ENOENT),
        ({"name": "d", "export-name": "y"}, errno.EINVAL),  # no --nbd server, no socket
        ({"name": "d", "socket": str(tmp_path / "t")}, errno.EEXIST),
        ({"name": "d", "export-name": "x", "socket": "rel"}, errno.EINVAL),
        ({"name": "d", "export-name": "x", "host": "127.0.0.1", "port": "99999"}, errno.EINVAL),
        (
            {"name": "d", "export-name": "x", "socket": str(tmp_path / "u"), "mode": "9"},
            errno.EINVAL,
        ),
        ({"name": "d", "export-name": "x", "port": "1"}, errno.EINVAL),
        (
            {"name": "d", "export-name": "x", "host": "192.0.2.77", "port": "0", "tls": "off"},
            errno.EADDRNOTAVAIL,
        ),
        (tcp, errno.EINVAL),  # plaintext TCP only when said
        (tcp | {"tls": "on"}, errno.EINVAL),  # TLS without credentials
        (tcp | {"tls": "off", "tls-creds": str(credentials)}, errno.EINVAL),
        (unix | {"tls-verify-peer": "on"}, errno.EINVAL),
        (unix | {"tls-creds": "creds"}, errno.EINVAL),  # relative
        (unix | {"tls-creds": str(tmp_path / "nosuch")}, errno.EINVAL),
        (unix | {"tls-creds": str(psk)}, errno.EINVAL),  # pre-shared keys: not on 3.11
        (unix | {"tls-creds": str(tmp_path)}, errno.EINVAL),  # no certificate there
        (unix | {"socket": str(tmp_path / "s"), "tls-creds": str(credentials)}, errno.EINVAL),
    ]:
        with pytest.raises(BlockError) as failed:
            await commands.run("export", args)
        assert failed.value.errno == code, args
    with pytest.raises(BlockError) as missing:
        await commands.run("export-del", {"name": "x"})
    assert missing.value.errno == errno.ENOENT
    assert without_stats(await commands.run("query-status", {})) == before
    assert sorted(os.listdir(tmp_path)) == ["d.img", "psk", "s"]
    assert len(commands.errors) == 18
    assert any("Python 3.13" in error for error in commands.errors)


async def test_export_del_and_delete_close_what_is_no_longer_offered(
    served, tmp_path: Path
) -> None:
    layer, commands, frontend = served
    sock = tmp_path / "s"
    await commands.run("export", {"name": "d", "socket": str(sock)})
    await commands.run("export", {"name": "d", "export-name": "again", "socket": str(sock)})
    await commands.run("export-del", {"name": "again"})
    assert sock.exists()  # d is still offered there
    remote = await layer.create("r", f"nbd+unix:///d?socket={sock},read-only=on")
    with pytest.raises(BlockError) as busy:
        await commands.run("export-del", {"name": "d"})
    assert busy.value.errno == errno.EBUSY
    await commands.run("delete", {"name": "d"})
    assert not sock.exists() and frontend.status()[0]["retired"]
    assert len(await remote.read(0, 4096)) == 4096  # a deleted backend serves its client
    await layer.delete("r")
    with trio.fail_after(5):
        while frontend.status():
            await trio.sleep(0.01)


async def test_a_client_that_has_hung_up_does_not_hold_its_export(served, tmp_path: Path) -> None:
    """A script that runs ``nbdcopy`` and then ``export-del`` is not refused because the server
    has not yet read the hang-up of the client that just left."""
    layer, commands, frontend = served
    sock = tmp_path / "s"
    await commands.run("export", {"name": "d", "socket": str(sock)})
    await layer.create("r", f"nbd+unix:///d?socket={sock},read-only=on")
    await layer.delete("r")  # disconnects; the export's session has not run since
    await commands.run("export-del", {"name": "d"})
    assert not frontend.status() and not sock.exists()


async def test_the_mounts_server_stays_without_exports(tmp_path: Path) -> None:
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "n", "medium": "driver=null,size=1M"})
    sock = tmp_path / "server"
    frontend = NbdFrontend(
        layer, commands, Address(path=str(sock)), [{"name": "n", "export-name": "null"}], mode=0o660
    )
    commands.exporter = frontend
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.serve)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        await commands.run("export-del", {"name": "n"})
        assert sock.exists() and not frontend.status()
        await commands.run("export", {"name": "n"})
        remote = await layer.create("r", f"nbd+unix:///?socket={sock},read-only=on")
        assert remote.length() == MiB
        await layer.delete("r")
        frontend.stop()
    assert not sock.exists()
    await layer.close()


async def test_a_frontend_that_cannot_start_says_why(tmp_path: Path) -> None:
    layer = BlockLayer()
    commands = Commands(layer)
    frontend = NbdFrontend(layer, commands, exports=[{"name": "nosuch"}])
    commands.exporter = frontend
    async with trio.open_nursery() as nursery:
        with pytest.raises(BlockError) as failed:
            await nursery.start(frontend.serve)
    assert failed.value.errno == errno.ENOENT
    (tmp_path / "taken").write_text("not a socket")
    frontend = NbdFrontend(layer, commands, Address(path=str(tmp_path / "taken")))
    async with trio.open_nursery() as nursery:
        with pytest.raises(BlockError) as taken:
            await nursery.start(frontend.serve)
    assert taken.value.errno == errno.EEXIST
    await layer.close()


@pytest.mark.parametrize(
    "text, address",
    [
        ("unix:/run/blkfs.sock", Address(path="/run/blkfs.sock")),
        ("192.0.2.1:10809", Address(host="192.0.2.1", port=10809)),
        ("[::1]:1234", Address(host="::1", port=1234)),
        ("localhost:0", Address(host="localhost", port=0)),
    ],
)
def test_nbd_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize("text", ["unix:relative", "10809", ":10809", "host:port", "h:70000"])
def test_bad_nbd_addresses(text: str) -> None:
    with pytest.raises(BlockError):
        parse_address(text)


def test_nbd_uris_are_nbd_nodes() -> None:
    assert parse_options("nbd://h:1234/a%20b,reconnect-delay=5") == {
        "driver": "nbd",
        "server": {"type": "inet", "host": "h", "port": "1234"},
        "export": "a b",
        "reconnect-delay": "5",
    }
    assert parse_options("nbd+unix:///e?socket=/run/s.sock") == {
        "driver": "nbd",
        "server": {"type": "unix", "path": "/run/s.sock"},
        "export": "e",
    }
    assert parse_options("nbds+unix:///e?socket=/s,tls-creds=/c")["tls-creds"] == "/c"
    assert nbd_uri("nbd://h/e,read-only=off,server.host=x") == {  # a name, never options
        "driver": "nbd",
        "server": {"type": "inet", "host": "h"},
        "export": "e,read-only=off,server.host=x",
    }
    assert nbd_uri("/srv/img/base.qcow2") is None and nbd_uri("nbd.img") is None
    for bad in (
        "nbds://h/e",  # TLS needs credentials
        "nbds+unix:///e?socket=/s",
        "nbd:///e",
        "nbd+unix:///e",
        "nbd+unix://h/e?socket=/s",
        "nbd://h/e?x=1",
        "nbd://h/e,driver=raw",
        "nbd://h:99999/e",
    ):
        with pytest.raises(BlockError):
            parse_options(bad)


def config(tmp_path: Path, toml: str, *argv: str) -> argparse.Namespace:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    return parser().parse_args(["mount", str(tmp_path / "m"), "--config", str(path), *argv])


async def test_the_config_makes_the_nbd_frontend(tmp_path: Path) -> None:
    args = config(
        tmp_path,
        f"""
nbd = "unix:{tmp_path}/nbd.sock"
nbd-mode = "0640"
[backends.n]
options = "driver=null,size=1M"
[exports.n]
export-name = "null"
""",
        "--export",
        "n export-name=again",
    )
    daemon_config, _ = build_config(args)
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", daemon_config.backends[0])
    assert daemon_config.exporter is not None
    frontend = daemon_config.exporter(layer, commands)
    assert isinstance(frontend, NbdFrontend)
    commands.exporter = frontend
    async with trio.open_nursery() as nursery:
        await nursery.start(frontend.serve)
        assert [e["name"] for e in frontend.status()] == ["null", "again"]
        assert stat.S_IMODE(os.stat(tmp_path / "nbd.sock").st_mode) == 0o640
        frontend.stop()
    await layer.close()
    for toml, argv in [
        ('nbd = "nowhere"', ()),
        ("[exports]\nn = 1", ()),
        ("", ("--export", "n wrong=1")),
        ("", ("--nbd-mode", "999")),
        ('nbd = "127.0.0.1:0"', ()),  # plaintext TCP, not said
        ('nbd = "127.0.0.1:0"\nnbd-tls = "maybe"', ()),
    ]:
        with pytest.raises(UsageError):
            build_config(config(tmp_path, toml, *argv))


def test_the_status_text_lists_exports_and_clients() -> None:
    text = format_exports(
        [
            {
                "name": "vm1",
                "backend": "d",
                "address": "unix:/s",
                "writable": True,
                "retired": False,
                "clients": [{"peer": "pid 7 (uid 0)", "in-flight": 2}],
                "stats": {"connections": 3, "errors": 1},
            }
        ]
    )
    assert text.split("\n")[1].split() == [
        "EXPORT",
        "BACKEND",
        "ADDRESS",
        "RW",
        "CLIENTS",
        "CONNECTIONS",
        "ERRORS",
    ]
    assert text.split("\n")[2].split() == ["vm1", "d", "unix:/s", "yes", "1", "3", "1"]
    assert "vm1: client pid 7 (uid 0), 2 in flight" in text
    assert format_exports([]) == ""


async def test_shutdown_lets_go_of_the_clients_of_a_closed_socket(tmp_path: Path) -> None:
    layer = BlockLayer()
    commands = Commands(layer)
    await commands.run("create", {"name": "n", "medium": "driver=null,size=1M"})
    frontend = NbdFrontend(layer, commands)
    commands.exporter = frontend
    sock = tmp_path / "own"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            await commands.run("export", {"name": "n", "socket": str(sock)})
            remote = await layer.create("r", f"nbd+unix:///n?socket={sock},read-only=on")
            await commands.run("delete", {"name": "n"})  # the socket closes, the client stays
            assert not sock.exists() and len(frontend.sessions) == 1
            assert len(await remote.read(0, 512)) == 512
            frontend.stop()
    assert not frontend.sessions
    await layer.close()


async def test_the_config_sets_the_servers_tls(tmp_path: Path, credentials: Path) -> None:
    for toml, tls in [
        (f'nbd-tls-creds = "{credentials}"\nnbd-tls-verify-peer = true', True),
        ("nbd-tls = false", False),
    ]:
        daemon_config, _ = build_config(config(tmp_path, f'nbd = "127.0.0.1:0"\n{toml}'))
        layer = BlockLayer()
        assert daemon_config.exporter is not None
        frontend = daemon_config.exporter(layer, Commands(layer))
        assert isinstance(frontend, NbdFrontend)
        async with trio.open_nursery() as nursery:
            await nursery.start(frontend.serve)
            assert frontend.default is not None
            assert (frontend.default.tls_context is not None, frontend.default.tls.verify_peer) == (
                tls,
                tls,
            )
            frontend.stop()
        await layer.close()
