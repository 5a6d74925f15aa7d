"""Which client certificates a TLS server lets in (QEMU's ``tls-authz``).

QEMU names an authz object that matches the distinguished name of the client's verified
certificate (authz-simple: one name; authz-list and authz-listfile: glob rules). blkfs reads
the allowed names from a file instead: one glob pattern per line (``fnmatch``, case
sensitive, as authz-listfile's ``format=glob``), blank lines and ``#`` comments skipped; a
name no line matches is refused. Names are written as QEMU (GnuTLS) prints them: the
certificate's attributes in its order, RFC 4514's short names and escapes, such as
``C=GB,O=Example,CN=client1`` (QEMU's own message for a refused client shows the name).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
}
"""RFC 4514's attribute names (and GnuTLS's EMAIL) for the long names :mod:`ssl` gives."""
SPECIAL = frozenset(',+"\\<>;')


class AuthzError(ValueError):
    """A tls-authz file that cannot be used; the message names it and what is wrong."""


def parse_allowed(path: str, text: str) -> tuple[str, ...]:
    """The patterns of a tls-authz file read from ``path``."""
    patterns = tuple(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not patterns:
        raise AuthzError(f"tls-authz {path}: no distinguished name is allowed (one glob a line)")
    return patterns


def read_allowed(path: str) -> tuple[str, ...]:
    """The patterns of the tls-authz file at ``path`` (blocking: run it in a thread)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise AuthzError(f"tls-authz {path}: {reason}") from None
    return parse_allowed(path, text)


def distinguished_name(subject: Sequence[Sequence[tuple[str, str]]]) -> str:
    """The subject of a certificate as :meth:`ssl.SSLSocket.getpeercert` gives it, written
    as GnuTLS does for QEMU: in the certificate's order, values escaped as RFC 4514 says."""
    return ",".join(
        "+".join(f"{SHORT_NAMES.get(key, key)}={_escaped(value)}" for key, value in rdn)
        for rdn in subject
    )


def allowed(patterns: Sequence[str], name: str) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _escaped(value: str) -> str:
    """RFC 4514's escapes: its special characters, a leading # or space, a trailing space."""
    last = len(value) - 1
    return "".join(
        f"\\{c}" if c in SPECIAL or (i == 0 and c in "# ") or (i == last and c == " ") else c
        for i, c in enumerate(value)
    )
