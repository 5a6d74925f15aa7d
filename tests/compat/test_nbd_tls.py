"""NBD over TLS with the reference peers, certificates made by the test (tests/tls.py):
qemu-nbd serving blkfs's nbd driver, and blkfs's TLS export read and written by qemu-img,
qemu-io, nbdinfo and nbdcopy, its monitor's block-export-add with QEMU's tls-creds; the
clients it must refuse (plaintext, no or a foreign client certificate) refused with the
protocol's errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.compat.peers import MiB, convert, run
from tests.conftest import needs_fuse
from tests.helpers import Mount, MountError, blkfs
from tests.nbdpeers import needs_nbd_tools, qemu_nbd
from tests.qmp.peer import drive
from tests.tls import client_named, client_of_another_ca

pytestmark = [needs_nbd_tools, needs_fuse, pytest.mark.fuse, pytest.mark.qemu]
SIZE = 8 * MiB


def tls_object(credentials: Path, endpoint: str = "client") -> str:
    return f"tls-creds-x509,id=tls0,dir={credentials},endpoint={endpoint}"


def test_qemu_nbd_over_tls_serves_the_nbd_driver(
    tmp_path: Path, credentials: Path, mount_factory
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(SIZE))
    expected = bytearray(image.read_bytes())
    sock = tmp_path / "q.sock"
    server_tls = f"{tls_object(credentials, 'server')},verify-peer=on"
    with qemu_nbd(image, "raw", sock, "--object", server_tls, "--tls-creds", "tls0"):
        mount = mount_factory(
            "--backend", f"r=nbds+unix:///disk0?socket={sock},tls-creds={credentials}"
        )
        payload = os.urandom(MiB)
        expected[3 * MiB + 512 : 4 * MiB + 512] = payload
        with open(mount / "r", "r+b") as f:
            f.seek(3 * MiB + 512)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert (mount / "r").read_bytes() == expected
        run("qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", image, mount / "r")
        assert '"tls": true' in json.dumps(mount.backends()["r"])
        plain = mount.ctl_errno("create", f"p nbd+unix:///disk0?socket={sock}")
        assert plain != 0 and "requires TLS" in mount.last_error()
    assert image.read_bytes() == expected


def tls_export(
    mount_factory, tmp_path: Path, credentials: Path, *tls: str
) -> tuple[Mount, str, Path]:
    """Backend d exported writable on the mount's TCP NBD server, which requires TLS with
    ``credentials`` and the mount options ``tls``; the server's ``HOST:PORT`` and the image."""
    image = convert(tmp_path, "disk", size=SIZE)
    mount = mount_factory(
        "--backend",
        f"d={image}",
        "--nbd",
        "127.0.0.1:0",
        "--nbd-tls-creds",
        str(credentials),
        *tls,
        "--export",
        "d writable=on",
    )
    (export,) = mount.status()["exports"]
    assert export["tls"]
    return mount, export["address"], image


@pytest.fixture
def tls_mount(tmp_path: Path, credentials: Path, mount_factory) -> tuple[Mount, str, Path]:
    """:func:`tls_export` with client certificates verified."""
    return tls_export(mount_factory, tmp_path, credentials, "--nbd-tls-verify-peer", "on")


def test_qemu_img_and_qemu_io_over_tls(tls_mount, credentials: Path) -> None:
    mount, where, _ = tls_mount
    host, port = where.rsplit(":", 1)
    opts = f"driver=nbd,server.type=inet,server.host={host},server.port={port},export=d"
    tls = ("--object", tls_object(credentials))
    run(
        "qemu-io",
        *tls,
        "--image-opts",
        "-c",
        "write -P 0x5a 100000 300000",
        "-c",
        "flush",
        f"{opts},tls-creds=tls0",
    )
    assert (mount / "d").read_bytes()[100000:400000] == b"\x5a" * 300000
    copy = mount.path.parent / "copy.raw"
    run("qemu-img", "convert", *tls, "--image-opts", f"{opts},tls-creds=tls0", "-O", "raw", copy)
    assert copy.read_bytes() == (mount / "d").read_bytes()
    plain = run("qemu-img", "info", "--image-opts", opts, check=False)
    assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
    assert mount.alive()


def test_nbdinfo_and_nbdcopy_over_tls(tls_mount, credentials: Path, tmp_path: Path) -> None:
    mount, where, _ = tls_mount
    uri = f"nbds://{where}/d?tls-certificates={credentials}"
    info = json.loads(run("nbdinfo", "--json", "--no-content", uri).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, out)
    assert out.read_bytes() == (mount / "d").read_bytes()
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(MiB) + bytes(SIZE - 2 * MiB) + os.urandom(MiB))
    run("nbdcopy", src, uri)
    assert (mount / "d").read_bytes() == src.read_bytes()


def test_clients_the_tls_export_refuses(tls_mount, credentials: Path, tmp_path: Path) -> None:
    mount, where, _ = tls_mount
    plain = subprocess.run(  # libnbd shows the server's error message only when debugging
        ["nbdinfo", f"nbd://{where}/d"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
    )
    assert plain.returncode != 0
    assert "server error message: this server requires TLS" in plain.stderr, plain.stderr
    rogue = client_of_another_ca(tmp_path / "rogue", credentials)
    for certificates in (rogue, credentials.parent / "no-such-dir"):
        refused = run("nbdinfo", f"nbds://{where}/d?tls-certificates={certificates}", check=False)
        assert refused.returncode != 0, refused.stdout
    (export,) = mount.status()["exports"]
    assert export["stats"]["connections"] == 0 and mount.alive()
    log = mount.log.read_text()
    assert "Traceback" not in log and "TLS handshake failed" in log


def test_a_tcp_server_needs_tls_or_says_plaintext(mount_factory, credentials: Path) -> None:
    with pytest.raises(MountError, match="--nbd-tls off"):
        mount_factory("--nbd", "127.0.0.1:0")
    mount = mount_factory(
        "--nbd", "127.0.0.1:0", "--nbd-tls", "off", "--backend", "n=driver=null,size=1M"
    )
    mount.ctl("export", "n")
    (plain,) = mount.status()["exports"]
    assert not plain["tls"] and plain["address"].startswith("127.0.0.1:")
    # blkfs ctl makes relative paths absolute, as the daemon's directory is not the user's
    blkfs(
        "ctl",
        str(mount.path),
        "export",
        "n",
        "export-name=t",
        "socket=t.sock",
        f"tls-creds={credentials.name}",
        cwd=credentials.parent,
    )
    secure = next(e for e in mount.status()["exports"] if e["name"] == "t")
    assert secure["tls"] and secure["address"] == f"unix:{credentials.parent / 't.sock'}"
    with pytest.raises(MountError, match="tls-creds"):
        mount_factory("--nbd", "127.0.0.1:0", "--nbd-tls-verify-peer", "on")


def test_block_export_add_with_tls_creds(mount_factory, credentials: Path, tmp_path: Path) -> None:
    sock = tmp_path / "qmp"
    mount = mount_factory(
        "--qmp", f"unix:{sock}", "--nbd", "127.0.0.1:0", "--nbd-tls-creds", str(credentials)
    )
    image = convert(tmp_path, "disk", size=SIZE)

    async def body(client: QMPClient) -> None:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}
        await client.execute("blockdev-add", {"node-name": "n0", **node})
        other = {"type": "nbd", "id": "e1", "node-name": "n0", "tls-creds": str(tmp_path)}
        with pytest.raises(ExecuteError, match="TLS"):  # not the server's credentials
            await client.execute("block-export-add", other)
        export = {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk"}
        await client.execute("block-export-add", export | {"tls-creds": str(credentials)})

    drive(sock, body)
    (export,) = mount.status()["exports"]
    assert export["tls"] and export["name"] == "disk"
    uri = f"nbds://{export['address']}/disk?tls-certificates={credentials}"
    assert json.loads(run("nbdinfo", "--json", "--no-content", uri).stdout)["TLS"] is True


ALICE = "O=blkfs tests,CN=alice.example.com"
"""A client certificate's distinguished name as QEMU's tls-authz objects match it."""


@pytest.fixture
def clients(tmp_path: Path, credentials: Path) -> tuple[Path, Path]:
    """Two clients' directories, certificates signed by the server's CA: alice's and
    mallory's."""
    alice = client_named(tmp_path / "alice", credentials, "/O=blkfs tests/CN=alice.example.com")
    mallory = client_named(tmp_path / "mallory", credentials, "/O=blkfs tests/CN=mallory")
    return alice, mallory


def test_tls_authz_lets_in_only_the_certificates_it_names(
    tmp_path: Path, credentials: Path, clients: tuple[Path, Path], mount_factory
) -> None:
    """qemu-io, qemu-img and nbdinfo with certificates of one CA: the client whose name a
    line of the tls-authz file matches reads and writes; another is refused with
    NBD_REP_ERR_POLICY, logged with the backend and its name; the daemon lives."""
    alice, mallory = clients
    authz = tmp_path / "allowed"
    authz.write_text("# who may connect\n\nO=blkfs tests,CN=alice.*\nO=blkfs tests,CN=bob\n")
    mount, address, _ = tls_export(
        mount_factory, tmp_path, credentials, "--nbd-tls-authz", str(authz)
    )
    host, port = address.rsplit(":", 1)
    opts = f"driver=nbd,server.type=inet,server.host={host},server.port={port},export=d"
    write = ("-c", "write -P 0x61 0 64k")
    run("qemu-io", "--object", tls_object(alice), "--image-opts", *write, f"{opts},tls-creds=tls0")
    assert (mount / "d").read_bytes()[: 64 * 1024] == b"a" * 64 * 1024
    uri = f"nbds://{address}/d?tls-certificates="
    assert json.loads(run("nbdinfo", "--json", f"{uri}{alice}").stdout)["TLS"] is True

    said = "client certificate 'O=blkfs tests,CN=mallory' is not allowed by tls-authz"
    mallory_opts = ("--object", tls_object(mallory), "--image-opts", f"{opts},tls-creds=tls0")
    refused = run("qemu-io", *mallory_opts, *write, check=False)
    assert refused.returncode != 0 and f"server reported: {said}" in refused.stderr, refused
    listed = subprocess.run(  # libnbd shows the server's error message only when debugging
        ["nbdinfo", "--list", f"{uri}{mallory}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
    )
    assert listed.returncode != 0 and f"server error message: {said}" in listed.stderr
    driver = f"nbds://{address}/d,tls-creds="  # blkfs's own nbd driver
    assert mount.ctl_errno("create", f"m {driver}{mallory}") == errno.EACCES
    assert said in mount.last_error()
    mount.ctl("create", f"a {driver}{alice}")
    assert (mount / "a").read_bytes() == (mount / "d").read_bytes()
    mount.ctl("delete", "a")
    (export,) = mount.status()["exports"]
    assert export["stats"]["connections"] == 3 and mount.alive()
    assert (mount / "d").read_bytes()[: 64 * 1024] == b"a" * 64 * 1024
    log = mount.log.read_text()
    assert "Traceback" not in log and f"client certificate '{ALICE}'" in log
    assert "d: nbd: 127.0.0.1:" in log and f"refused export 'd': {said} {authz}" in log
    assert f"refused the export list: {said} {authz}" in log


def test_qemu_names_a_certificate_as_tls_authz_does(
    tmp_path: Path, credentials: Path, clients: tuple[Path, Path]
) -> None:
    """The name a tls-authz line matches is the one QEMU's authz objects match: qemu-nbd
    with authz-simple for ALICE lets alice in and refuses mallory."""
    alice, mallory = clients
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    sock = tmp_path / "q.sock"
    identity = ALICE.replace(",", ",,")
    with qemu_nbd(
        image,
        "raw",
        sock,
        "--object",
        f"{tls_object(credentials, 'server')},verify-peer=on",
        "--object",
        f"authz-simple,id=authz0,identity={identity}",
        "--tls-creds",
        "tls0",
        "--tls-authz",
        "authz0",
    ):
        opts = (
            f"driver=nbd,server.type=unix,server.path={sock},export=disk0,"
            "tls-creds=tls0,tls-hostname=localhost"
        )
        run("qemu-img", "info", "--object", tls_object(alice), "--image-opts", opts)
        refused = run(
            "qemu-img", "info", "--object", tls_object(mallory), "--image-opts", opts, check=False
        )
        assert refused.returncode != 0


@pytest.mark.parametrize(
    ("words", "says"),
    [
        ("tls-authz=allowed", "must be an absolute file name"),
        ("tls-authz={dir}/nosuch", "tls-authz {dir}/nosuch: No such file or directory"),
        ("tls-authz={dir}/empty", "no distinguished name is allowed"),
        ("tls-authz={dir}/allowed tls-verify-peer=off", "cannot be given with tls-verify-peer=off"),
        ("tls-authz={dir}/allowed tls=off", "tls=off cannot be given"),
    ],
)
def test_a_bad_tls_authz_exports_nothing(
    mount_factory, credentials: Path, tmp_path: Path, words: str, says: str
) -> None:
    (tmp_path / "allowed").write_text(ALICE + "\n")
    (tmp_path / "empty").write_text("# nobody\n")
    mount = mount_factory("--backend", "n=driver=null,size=1M")
    sock = tmp_path / "e.sock"
    given = words.format(dir=tmp_path)
    assert mount.ctl_errno("export", f"n socket={sock} tls-creds={credentials} {given}") != 0
    assert says.format(dir=tmp_path) in mount.last_error()
    assert mount.status()["exports"] == [] and not sock.exists()


def test_block_export_add_with_tls_authz(
    mount_factory, credentials: Path, clients: tuple[Path, Path], tmp_path: Path
) -> None:
    alice, mallory = clients
    authz = tmp_path / "allowed"
    authz.write_text(ALICE + "\n")
    sock = tmp_path / "qmp"
    mount = mount_factory(
        "--qmp",
        f"unix:{sock}",
        "--nbd",
        "127.0.0.1:0",
        "--nbd-tls-creds",
        str(credentials),
        "--nbd-tls-authz",
        str(authz),
    )
    image = convert(tmp_path, "disk", size=SIZE)

    async def body(client: QMPClient) -> None:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}
        await client.execute("blockdev-add", {"node-name": "n0", **node})
        export = {"type": "nbd", "id": "e0", "node-name": "n0", "tls-creds": str(credentials)}
        with pytest.raises(ExecuteError, match="takes its TLS as it is"):  # not the server's
            await client.execute("block-export-add", export)
        with pytest.raises(ExecuteError, match="'tls-authz' is unexpected"):
            await client.execute(
                "block-export-add", {"type": "fuse", "id": "f", "node-name": "n0", "tls-authz": "x"}
            )
        await client.execute("block-export-add", export | {"tls-authz": str(authz)})

    drive(sock, body)
    (export,) = mount.status()["exports"]
    uri = f"nbds://{export['address']}/n0?tls-certificates="
    assert json.loads(run("nbdinfo", "--json", f"{uri}{alice}").stdout)["TLS"] is True
    assert run("nbdinfo", f"{uri}{mallory}", check=False).returncode != 0
