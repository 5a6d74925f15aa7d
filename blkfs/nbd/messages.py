"""The messages both sides send, as bytes and back: options and their replies, requests and
the replies a server builds; and the rules a server checks a request against."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from blkfs.nbd.values import (
    CHUNK,
    COMMAND_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    ERROR,
    EXTENT,
    HOLE,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_STRING,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    WRITES,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    ProtocolError,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)


@dataclass(frozen=True)
class ExportInfo:
    """What a server tells of an export (NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE, ...)."""

    name: str
    size: int
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    description: str = ""
    meta_contexts: tuple[str, ...] = ()
    """Metadata contexts it offers beyond the server's own (``qemu:dirty-bitmap:NAME``)."""


def decode_string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING or b"\0" in data:
        raise ProtocolError(f"{what} is longer than {MAX_STRING} bytes or holds a NUL")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def encode_string(text: str) -> bytes:
    """A string to send: UTF-8, at most MAX_STRING bytes (a message is cut short)."""
    return text.encode("utf-8", "replace")[:MAX_STRING].decode("utf-8", "ignore").encode()


def sized_string(name: str) -> bytes:
    """A 32-bit length and a string, as names and queries are sent inside options."""
    data = encode_string(name)
    return U32.pack(len(data)) + data


class Cursor:
    """Reads fields off one option or reply payload; running short is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.at, self.what = data, 0, what

    def take(self, length: int) -> bytes:
        if length < 0 or self.at + length > len(self.data):
            raise ProtocolError(f"{self.what} is shorter than its fields say")
        self.at += length
        return self.data[self.at - length : self.at]

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))

    def string(self, what: str) -> str:
        (length,) = self.unpack(U32)
        return decode_string(self.take(length), what)

    def end(self) -> None:
        if self.at != len(self.data):
            raise ProtocolError(f"{self.what} has {len(self.data) - self.at} bytes too many")


def option(opt: int, data: bytes = b"") -> bytes:
    """A client's option request."""
    return OPTION.pack(IHAVEOPT, opt, len(data)) + data


def option_reply(opt: int, reply: int, data: bytes = b"") -> bytes:
    """A server's reply to an option."""
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, reply, len(data)) + data


def info_request(name: str, infos: Iterable[Info] = ()) -> bytes:
    """The data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information asked."""
    wanted = list(infos)
    return sized_string(name) + U16.pack(len(wanted)) + b"".join(U16.pack(i) for i in wanted)


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    cursor = Cursor(data, "NBD_OPT_GO")
    name = cursor.string("the export name")
    (count,) = cursor.unpack(U16)
    infos = [cursor.unpack(U16)[0] for _ in range(count)]
    cursor.end()
    return name, infos


def meta_context_request(name: str, queries: Iterable[str]) -> bytes:
    """The data of NBD_OPT_{LIST,SET}_META_CONTEXT."""
    wanted = list(queries)
    return sized_string(name) + U32.pack(len(wanted)) + b"".join(sized_string(q) for q in wanted)


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    cursor = Cursor(data, "NBD_OPT_SET_META_CONTEXT")
    name = cursor.string("the export name")
    (count,) = cursor.unpack(U32)
    if count > len(data) // 4:  # each query takes at least its length field
        raise ProtocolError("NBD_OPT_SET_META_CONTEXT counts more queries than it holds")
    queries = [cursor.string("a metadata context query") for _ in range(count)]
    cursor.end()
    return name, queries


def info_replies(opt: int, export: ExportInfo, infos: Sequence[int]) -> bytes:
    """The NBD_REP_INFO replies for ``export``: size and flags, block sizes always (the
    server's are not the defaults a client might assume), name and description if asked."""
    replies = [
        INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags),
        INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_payload
        ),
    ]
    if Info.NAME in infos:
        replies.append(U16.pack(Info.NAME) + encode_string(export.name))
    if Info.DESCRIPTION in infos and export.description:
        replies.append(U16.pack(Info.DESCRIPTION) + encode_string(export.description))
    return b"".join(option_reply(opt, Rep.INFO, r) for r in replies)


def parse_info(data: bytes, export: ExportInfo) -> ExportInfo:
    """``export`` updated with one NBD_REP_INFO; unknown information is ignored."""
    cursor = Cursor(data, "NBD_REP_INFO")
    (kind,) = cursor.unpack(U16)
    if kind == Info.EXPORT:
        size, flags = cursor.unpack(struct.Struct(">QH"))
        cursor.end()
        return replace(export, size=size, flags=TransmissionFlag(flags))
    if kind == Info.BLOCK_SIZE:
        minimum, preferred, maximum = cursor.unpack(struct.Struct(">III"))
        cursor.end()
        if not _sane_block_sizes(minimum, preferred, maximum):
            raise ProtocolError(f"block sizes {minimum}/{preferred}/{maximum} break the rules")
        return replace(export, min_block=minimum, preferred_block=preferred, max_payload=maximum)
    if kind == Info.NAME:
        return replace(export, name=decode_string(data[2:], "the export name"))
    if kind == Info.DESCRIPTION:
        return replace(export, description=decode_string(data[2:], "the export description"))
    return export


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _sane_block_sizes(minimum: int, preferred: int, maximum: int) -> bool:
    """The spec's constraints: powers of two, minimum at most 64 KiB, preferred at least the
    minimum and 512, maximum at least the preferred."""
    return (
        _power_of_two(minimum)
        and minimum <= 1 << 16
        and _power_of_two(preferred)
        and preferred >= max(minimum, 512)
        and maximum >= preferred
    )


def server_reply(name: str, description: str = "") -> bytes:
    """The data of one NBD_REP_SERVER (NBD_OPT_LIST)."""
    return sized_string(name) + encode_string(description)


def meta_context_reply(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + encode_string(name)


@dataclass(frozen=True)
class Negotiated:
    """What a handshake settled: the export, and what the transmission phase may use."""

    export: ExportInfo
    structured: bool
    contexts: dict[str, int] = field(default_factory=dict)
    """Selected metadata contexts: name -> id."""


class Request(NamedTuple):
    """A request header (a WRITE's data follows it on the wire)."""

    flags: int
    type: int
    cookie: int
    offset: int = 0
    length: int = 0

    def pack(self) -> bytes:
        return REQUEST.pack(
            REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length
        )

    @property
    def payload(self) -> int:
        """Bytes of data that follow the header."""
        return self.length if self.type == Cmd.WRITE else 0


def parse_request(data: bytes) -> Request:
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


_COMMAND_MASKS = {int(kind): int(mask) for kind, mask in COMMAND_FLAGS.items() if kind != Cmd.DISC}
"""The flags of each command as plain ints: enum arithmetic costs microseconds a request."""
_DF, _FAST_ZERO = int(CmdFlag.DF), int(CmdFlag.FAST_ZERO)
_READ_ONLY, _SEND_FAST_ZERO = int(TransmissionFlag.READ_ONLY), int(TransmissionFlag.SEND_FAST_ZERO)


def check_request(request: Request, negotiated: Negotiated) -> tuple[Errno, str] | None:
    """Why a server must refuse ``request`` on the export it negotiated (the error and a
    sentence for the client), or None if it is well formed (NBD_CMD_DISC is the caller's to
    handle first). Mirrors the spec's SHOULDs: unknown commands and flags, oversized
    payloads, and reads, trims and block status past the end, are EINVAL; writes past the
    end ENOSPC; writes to a read-only export EPERM."""
    export = negotiated.export
    kind, flags, end = request.type, request.flags, request.offset + request.length
    offered = int(export.flags)
    allowed = _COMMAND_MASKS.get(kind)
    if allowed is None:
        return Errno.EINVAL, f"unknown command {kind}"
    if flags & ~allowed:
        return Errno.EINVAL, f"flags {flags:#x} are not valid for {Cmd(kind).name}"
    if kind == Cmd.READ and flags & _DF and not negotiated.structured:
        return Errno.EINVAL, "NBD_CMD_FLAG_DF needs structured replies"
    if kind == Cmd.BLOCK_STATUS and not negotiated.contexts:
        return Errno.EINVAL, "no metadata context was selected"
    if kind in WRITES and offered & _READ_ONLY:
        return Errno.EPERM, "the export is read-only"
    if kind == Cmd.WRITE_ZEROES and flags & _FAST_ZERO and not offered & _SEND_FAST_ZERO:
        return Errno.EINVAL, "fast zeroing was not offered"
    if kind in (Cmd.READ, Cmd.WRITE) and request.length > export.max_payload:
        return Errno.EINVAL, (
            f"{request.length} bytes is more than the maximum payload {export.max_payload}"
        )
    if kind != Cmd.FLUSH and end > export.size:
        return (
            Errno.ENOSPC if kind in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL,
            f"{request.offset}+{request.length} is past the end ({export.size})",
        )
    if kind == Cmd.FLUSH and (request.offset or request.length):
        return Errno.EINVAL, "a flush has no offset or length"
    return None


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply (a READ's data follows it when the error is 0)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(
    cookie: int,
    kind: ReplyType,
    payload: bytes = b"",
    *,
    done: bool = True,
    length: int | None = None,
) -> bytes:
    """A structured reply chunk; ``length`` counts data that the caller sends after it."""
    size = len(payload) if length is None else length
    return (
        CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE if done else 0, kind, cookie, size)
        + payload
    )


def offset_data(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """An OFFSET_DATA chunk's header and offset; its ``length`` bytes of data follow."""
    return chunk(
        cookie, ReplyType.OFFSET_DATA, U64.pack(offset), done=done, length=U64.size + length
    )


def offset_hole(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, HOLE.pack(offset, length), done=done)


def block_status(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], *, done: bool = True
) -> bytes:
    """A BLOCK_STATUS chunk of ``(length, flags)`` descriptors (one per context selected;
    the last of the reply is ``done``)."""
    return chunk(
        cookie,
        ReplyType.BLOCK_STATUS,
        U32.pack(context_id) + b"".join(EXTENT.pack(length, flags) for length, flags in extents),
        done=done,
    )


def error_chunk(cookie: int, error: int, message: str, *, done: bool = True) -> bytes:
    text = encode_string(message)
    return chunk(cookie, ReplyType.ERROR, ERROR.pack(error, len(text)) + text, done=done)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, ReplyType.NONE)


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent descriptors with the same flags as one (the spec's SHOULD)."""
    merged: list[tuple[int, int]] = []
    for length, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        else:
            merged.append((length, flags))
    return merged
