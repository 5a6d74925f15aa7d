"""TLS credentials for NBD, from a directory laid out as QEMU's ``tls-creds-x509`` object
expects it: ``ca-cert.pem`` (the authority that signs the peers' certificates),
``server-cert.pem`` and ``server-key.pem`` (a server's), ``client-cert.pem`` and
``client-key.pem`` (a client's, optional). The standard library's :mod:`ssl` does the
cryptography; this module only builds its contexts, and raises :class:`CredentialsError`
naming the file that is missing or wrong.

Pre-shared keys (QEMU's ``tls-creds-psk``, a ``keys.psk`` file) are not read: they need
the PSK callbacks ``ssl`` gained in Python 3.13, and blkfs runs on Debian 12's 3.11; a
directory holding only ``keys.psk`` is refused with a message that says so.
"""

from __future__ import annotations

import os
import ssl
import sys

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
PSK_KEYS = "keys.psk"


class CredentialsError(ValueError):
    """A credentials directory that cannot be used; the message names what is wrong."""


def server_context(directory: str, verify_peer: bool) -> ssl.SSLContext:
    """A server's context: its certificate and key; with ``verify_peer``, clients must
    present a certificate signed by the directory's CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, directory, SERVER_CERT, SERVER_KEY)
    if verify_peer:
        _load_ca(context, directory)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(directory: str, check_hostname: bool) -> ssl.SSLContext:
    """A client's context: the server's certificate must be signed by the directory's CA
    (and name the host, if ``check_hostname``); the client's own certificate is sent if the
    directory has one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    _load_ca(context, directory)
    if os.path.exists(os.path.join(directory, CLIENT_CERT)):
        _load_chain(context, directory, CLIENT_CERT, CLIENT_KEY)
    return context


def _load_ca(context: ssl.SSLContext, directory: str) -> None:
    path = _path(directory, CA_CERT)
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"tls-creds {directory}: {CA_CERT}: {_reason(exc)}") from None


def _load_chain(context: ssl.SSLContext, directory: str, cert: str, key: str) -> None:
    cert_path, key_path = _path(directory, cert), _path(directory, key)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(
            f"tls-creds {directory}: {cert} with {key}: {_reason(exc)}"
        ) from None


def _path(directory: str, name: str) -> str:
    if not os.path.isdir(directory):
        raise CredentialsError(f"tls-creds {directory}: not a directory")
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, PSK_KEYS)):
            raise CredentialsError(
                f"tls-creds {directory}: blkfs reads x509 credentials only; pre-shared keys "
                f"({PSK_KEYS}) would need Python 3.13's ssl PSK callbacks (this is Python "
                f"{sys.version_info[0]}.{sys.version_info[1]})"
            )
        raise CredentialsError(f"tls-creds {directory}: no {name}")
    return path


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
