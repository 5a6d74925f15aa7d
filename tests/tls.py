"""x509 credentials made by the test with ``openssl``, laid out as QEMU's tls-creds-x509 and
libnbd's ``tls-certificates`` read a directory: ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem``, ``client-cert.pem`` and ``client-key.pem``. The extensions are the ones
QEMU checks (a CA that says it is one, key usages for TLS, names in subjectAltName)."""

from __future__ import annotations

import subprocess
from pathlib import Path

HOSTS = ("localhost", "127.0.0.1")
"""Names the server certificate carries unless told otherwise."""


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _signed(directory: Path, ca: Path, who: str, extensions: list[str], subject: str = "") -> None:
    """``WHO-key.pem`` and ``WHO-cert.pem`` signed by ``ca`` (a directory with its key), for
    ``subject`` (openssl's /KEY=VALUE form; default /CN=blkfs test WHO)."""
    request = directory / f"{who}.csr"
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        directory / f"{who}-key.pem",
        "-out",
        request,
        "-subj",
        subject or f"/CN=blkfs test {who}",
    )
    config = directory / f"{who}.ext"
    config.write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca / "ca-cert.pem",
        "-CAkey",
        ca / "ca-key.pem",
        "-set_serial",
        str(abs(hash((directory, who))) % (1 << 62)),
        "-days",
        "2",
        "-extfile",
        config,
        "-out",
        directory / f"{who}-cert.pem",
    )
    request.unlink()
    config.unlink()


def make_ca(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        directory / "ca-key.pem",
        "-out",
        directory / "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=blkfs test CA {directory.name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return directory


def make_credentials(directory: Path, hosts: tuple[str, ...] = HOSTS) -> Path:
    """One directory with a new CA, a server certificate for ``hosts`` and a client
    certificate: what both ends of a connection read (each takes the files it needs)."""
    make_ca(directory)
    names = ",".join(f"IP:{h}" if h[0].isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    usage = ["basicConstraints=critical,CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    _signed(
        directory,
        directory,
        "server",
        [*usage, "extendedKeyUsage=serverAuth", f"subjectAltName={names}"],
    )
    _signed(directory, directory, "client", [*usage, "extendedKeyUsage=clientAuth"])
    return directory


def client_of_another_ca(directory: Path, credentials: Path) -> Path:
    """A client's directory that trusts the server's CA but whose own certificate was
    signed by a CA the server does not know."""
    rogue = make_ca(directory.with_name(directory.name + "-ca"))
    directory.mkdir(parents=True, exist_ok=True)
    usage = ["basicConstraints=critical,CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    _signed(directory, rogue, "client", [*usage, "extendedKeyUsage=clientAuth"])
    (directory / "ca-cert.pem").write_bytes((credentials / "ca-cert.pem").read_bytes())
    return directory


def client_named(directory: Path, credentials: Path, subject: str) -> Path:
    """A client's directory with a certificate for ``subject`` (openssl's /KEY=VALUE form)
    signed by the CA of ``credentials``, which it trusts."""
    directory.mkdir(parents=True, exist_ok=True)
    usage = ["basicConstraints=critical,CA:FALSE", "keyUsage=digitalSignature,keyEncipherment"]
    _signed(directory, credentials, "client", [*usage, "extendedKeyUsage=clientAuth"], subject)
    (directory / "ca-cert.pem").write_bytes((credentials / "ca-cert.pem").read_bytes())
    return directory
