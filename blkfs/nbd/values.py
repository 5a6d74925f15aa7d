"""The protocol's values: magic numbers, flags, option, reply and command types, errors,
the wire layout of each header, and how errno maps to the error values (the spec's
"Values" section, with its names)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", the INIT_PASSWD
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
DEFAULT_PORT = 10809
BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
"""QEMU's context of a dirty bitmap: this, then the bitmap's name; flag 1 is dirty."""
STATE_DIRTY = 1 << 0

MAX_STRING = 4096
"""Longest string (export name, message) the spec allows."""
MAX_OPTION_DATA = 64 << 10
"""Longest option or option reply accepted; longer is an attack, not a request."""
MAX_OPTIONS = 128
"""Options one negotiation may take before the server hangs up."""
MAX_EXTENTS = 1 << 20
"""Most block status descriptors in one chunk (the spec's SHOULD NOT exceed)."""
DEFAULT_MAX_PAYLOAD = 32 << 20


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


REP_ERROR = 1 << 31


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR | 1
    ERR_POLICY = REP_ERROR | 2
    ERR_INVALID = REP_ERROR | 3
    ERR_PLATFORM = REP_ERROR | 4
    ERR_TLS_REQD = REP_ERROR | 5
    ERR_UNKNOWN = REP_ERROR | 6
    ERR_SHUTDOWN = REP_ERROR | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR | 8
    ERR_TOO_BIG = REP_ERROR | 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(IntFlag):
    DONE = 1 << 0


REPLY_TYPE_ERROR = 1 << 15


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = REPLY_TYPE_ERROR | 1
    ERROR_OFFSET = REPLY_TYPE_ERROR | 2


class State(IntFlag):
    """Block status flags of the ``base:allocation`` context (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class Errno(IntEnum):
    """The error values a reply may carry; Linux's errno numbers, as the spec chose them."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


NO_FLAGS = CmdFlag(0)
COMMAND_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: NO_FLAGS,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
"""The flags each command may carry (FUA on any, as the spec allows)."""
WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zeros)
EXPORT_NAME_PADDING = 124
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16, U32, U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
HOLE = struct.Struct(">QI")  # offset, hole size
ERROR = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot be used any more."""


class Refused(Exception):
    """A server refused an option (an error reply), with its message: the export is unknown,
    the server is shutting down, ...; ``exports`` lists what it offers, when known."""

    def __init__(self, reply: int, message: str, exports: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reply = reply
        self.exports = tuple(exports)


# -- errno ------------------------------------------------------------------------------------

_TO_NBD = {
    errno.EPERM: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}
_FROM_NBD: dict[int, int] = {value: getattr(errno, value.name) for value in Errno}


def to_nbd_errno(code: int) -> Errno:
    """The reply error for a host errno, as the spec maps them (EROFS is EPERM, EDQUOT is
    ENOSPC); one it has no value for (ENOMEDIUM, ESTALE) is EIO: the medium failed."""
    return _TO_NBD.get(code, Errno.EIO)


def from_nbd_errno(value: int) -> int:
    """The host errno for a reply's error; one the spec does not define is EINVAL, as it
    says a client should take it."""
    return _FROM_NBD.get(value, errno.EINVAL)


@dataclass(frozen=True)
class Address:
    """Where an NBD server listens: a unix socket, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return (
            f"[{self.host}]:{self.port}" if ":" in (self.host or "") else f"{self.host}:{self.port}"
        )
