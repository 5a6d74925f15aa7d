"""The client's side of the transmission phase: requests by cookie, and every reply checked
against the request it answers; and the receive buffer both sides read headers from."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

from blkfs.nbd.messages import Negotiated, Request
from blkfs.nbd.values import (
    CHUNK,
    COMMAND_FLAGS,
    ERROR,
    EXTENT,
    HOLE,
    MAX_EXTENTS,
    MAX_OPTION_DATA,
    NO_FLAGS,
    REPLY_TYPE_ERROR,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U64,
    Cmd,
    CmdFlag,
    ProtocolError,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
    from_nbd_errno,
)


class Reply(NamedTuple):
    """The outcome of one request: ``error`` is a host errno (0: success)."""

    cookie: int
    error: int = 0
    message: str = ""
    extents: tuple[tuple[int, int], ...] = ()
    """BLOCK_STATUS: ``(length, flags)`` of the first context asked for."""


@dataclass(slots=True)
class _Pending:
    request: Request
    buf: memoryview | None
    covered: list[tuple[int, int]] = field(default_factory=list)
    """Sorted, disjoint, merged ``[start, end)`` runs of a read answered so far."""
    error: int = 0
    message: str = ""
    extents: tuple[tuple[int, int], ...] = ()


class _Chunk(NamedTuple):
    """The reply being received: a structured chunk's header, or a simple reply."""

    cookie: int
    kind: int
    length: int
    done: bool
    simple_error: int | None = None
    """A simple reply's error field (None for a structured chunk)."""


_DONE, _REQ_ONE = int(ReplyFlag.DONE), int(CmdFlag.REQ_ONE)
"""As plain ints: enum arithmetic costs microseconds a reply."""


class ClientTransmission:
    """A client's view of the transmission phase: requests by cookie, and every reply
    checked against its request (the cookie is one in flight, a chunk lies inside what was
    asked and overlaps nothing already answered, a read is complete when done) before it
    changes anything.

    Replies are taken in three steps, so that a read's data can go straight from the socket
    into the caller's buffer: :meth:`header` (after :meth:`header_size` says how long it is)
    returns the bytes of payload to read; :meth:`payload` returns the buffer to fill with the
    data that follows, or None; :meth:`end` returns the :class:`Reply` once a request is
    complete.
    """

    def __init__(self, negotiated: Negotiated) -> None:
        self.negotiated = negotiated
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._chunk: _Chunk | None = None
        self._context = next(iter(negotiated.contexts.values()), None)
        offered = negotiated.export.flags
        unoffered = sum(
            int(flag)
            for flag, needs in (
                (CmdFlag.FUA, TransmissionFlag.SEND_FUA),
                (CmdFlag.DF, TransmissionFlag.SEND_DF),
                (CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO),
            )
            if not offered & needs
        )
        self._allowed = {int(kind): int(mask) & ~unoffered for kind, mask in COMMAND_FLAGS.items()}
        """The flags each command may carry on this export, as plain ints (fast)."""

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def request(
        self,
        kind: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag = NO_FLAGS,
        buf: memoryview | None = None,
    ) -> tuple[int, bytes]:
        """A new request's cookie and header (a WRITE's data is sent after it); ``buf``
        receives a READ's data. Asking what was not negotiated is a ValueError (a bug)."""
        if int(flags) & ~self._allowed.get(kind, 0):
            raise ValueError(f"flags {flags!r} not valid for {Cmd(kind).name} on this export")
        if kind == Cmd.BLOCK_STATUS and self._context is None:
            raise ValueError("no metadata context was negotiated")
        if kind == Cmd.READ and (buf is None or buf.nbytes != length):
            raise ValueError("a read needs a buffer of its length")
        cookie = next(self._cookies)
        request = Request(flags, kind, cookie, offset, length)
        if kind != Cmd.DISC:
            self._pending[cookie] = _Pending(request, buf if kind == Cmd.READ else None)
        return cookie, request.pack()

    def forget(self, cookie: int) -> None:
        """The caller no longer waits (cancelled): a read's data goes to a scratch buffer
        from now on, never into memory the caller may reuse."""
        pending = self._pending.get(cookie)
        if pending is not None and pending.buf is not None:
            pending.buf = memoryview(bytearray(pending.buf.nbytes))

    def abandon(self) -> None:
        """The connection is gone: every request in flight is forgotten."""
        self._pending.clear()
        self._chunk = None

    def header_size(self, magic: bytes) -> int:
        """The length of the reply header whose first four bytes are ``magic``."""
        (value,) = U32.unpack(magic)
        if value == SIMPLE_REPLY_MAGIC:
            return SIMPLE_REPLY.size
        if value == STRUCTURED_REPLY_MAGIC and self.negotiated.structured:
            return CHUNK.size
        raise ProtocolError(f"bad reply magic {value:#x}")

    def header(self, data: bytes) -> int:
        """Take a whole reply header; returns how many payload bytes to read next."""
        if len(data) == SIMPLE_REPLY.size:
            magic, error, cookie = SIMPLE_REPLY.unpack(data)
            flags, kind, length = _DONE, -1, 0
        else:
            magic, flags, kind, cookie, length = CHUNK.unpack(data)
        if magic not in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
            raise ProtocolError(f"bad reply magic {magic:#x}")
        pending = self._pending.get(cookie)
        if pending is None:
            raise ProtocolError(f"reply for cookie {cookie}, which is not in flight")
        request = pending.request
        if magic == SIMPLE_REPLY_MAGIC:
            if request.type == Cmd.READ and self.negotiated.structured and not error:
                raise ProtocolError("a simple reply to a read after structured replies")
            self._chunk = _Chunk(cookie, -1, 0, True, error)
            return 0
        done = bool(flags & _DONE)
        self._check_chunk_length(request, kind, length, done)
        self._chunk = _Chunk(cookie, kind, length, done)
        return U64.size if kind == ReplyType.OFFSET_DATA else length

    @staticmethod
    def _check_chunk_length(request: Request, kind: int, length: int, done: bool) -> None:
        read = request.type == Cmd.READ
        if kind == ReplyType.OFFSET_DATA:
            fits = read and U64.size < length <= U64.size + request.length
        elif kind == ReplyType.OFFSET_HOLE:
            fits = read and length == HOLE.size
        elif kind == ReplyType.NONE:
            fits = length == 0 and done
        elif kind == ReplyType.BLOCK_STATUS:
            fits = (
                request.type == Cmd.BLOCK_STATUS
                and U32.size + EXTENT.size <= length <= U32.size + EXTENT.size * MAX_EXTENTS
                and (length - U32.size) % EXTENT.size == 0
            )
        else:
            fits = bool(kind & REPLY_TYPE_ERROR) and ERROR.size <= length <= MAX_OPTION_DATA
        if not fits:
            raise ProtocolError(
                f"reply chunk type {kind} of {length} bytes does not answer "
                f"{Cmd(request.type).name} of {request.length} bytes"
            )

    def payload(self, data: bytes) -> memoryview | None:
        """Take the payload :meth:`header` asked for; returns where the data that follows
        goes (a read's buffer, or a slice of it), or None if nothing follows."""
        current = self._chunk
        assert current is not None, "payload() follows header()"
        pending = self._pending[current.cookie]
        request = pending.request
        if current.simple_error is not None:
            if current.simple_error:
                pending.error = from_nbd_errno(current.simple_error)
            elif request.type == Cmd.READ:
                pending.covered = [(0, request.length)]
                return pending.buf
            return None
        kind = current.kind
        if kind == ReplyType.OFFSET_DATA:
            (offset,) = U64.unpack(data)
            start = self._cover(pending, offset, current.length - U64.size)
            assert pending.buf is not None
            return pending.buf[start : start + current.length - U64.size]
        if kind == ReplyType.OFFSET_HOLE:
            offset, size = HOLE.unpack(data)
            start = self._cover(pending, offset, size)
            assert pending.buf is not None
            pending.buf[start : start + size] = bytes(size)
        elif kind == ReplyType.BLOCK_STATUS:
            self._block_status(pending, data)
        elif kind & REPLY_TYPE_ERROR:
            self._error(pending, kind, data)
        return None

    def _cover(self, pending: _Pending, offset: int, length: int) -> int:
        """Record that ``length`` bytes at ``offset`` were answered; their start in the
        read's buffer. Outside the request, empty or overlapping is a ProtocolError."""
        request = pending.request
        start, end = offset - request.offset, offset - request.offset + length
        if length == 0 or start < 0 or end > request.length:
            raise ProtocolError(
                f"reply chunk {offset}+{length} lies outside the read "
                f"{request.offset}+{request.length}"
            )
        covered = pending.covered
        at = bisect.bisect(covered, (start, end))
        if (at and covered[at - 1][1] > start) or (at < len(covered) and covered[at][0] < end):
            raise ProtocolError(f"reply chunk {offset}+{length} overlaps an earlier one")
        first, last = start, end
        if at and covered[at - 1][1] == start:  # adjacent runs become one
            at -= 1
            first = covered.pop(at)[0]
        if at < len(covered) and covered[at][0] == end:
            last = covered.pop(at)[1]
        covered.insert(at, (first, last))
        return start

    def _block_status(self, pending: _Pending, data: bytes) -> None:
        request = pending.request
        (context_id,) = U32.unpack_from(data)
        if context_id not in self.negotiated.contexts.values():
            raise ProtocolError(f"block status for context {context_id}, never selected")
        extents = tuple(EXTENT.iter_unpack(data[U32.size :]))
        if any(length == 0 for length, _ in extents):
            raise ProtocolError("a block status descriptor of length 0")
        if request.flags & _REQ_ONE and (len(extents) > 1 or extents[0][0] > request.length):
            raise ProtocolError("more than the one extent asked for")
        if sum(length for length, _ in extents[:-1]) >= request.length:
            raise ProtocolError("block status descriptors past the length asked")
        if context_id == self._context:
            pending.extents = extents

    def _error(self, pending: _Pending, kind: int, data: bytes) -> None:
        error, length = ERROR.unpack_from(data)
        if error == 0 or ERROR.size + length > len(data):
            raise ProtocolError(
                "an error chunk without an error or with a message longer than the chunk"
            )
        message = data[ERROR.size : ERROR.size + length].decode("utf-8", "replace")
        if kind == ReplyType.ERROR_OFFSET:
            request = pending.request
            if len(data) != ERROR.size + length + U64.size:
                raise ProtocolError("NBD_REPLY_TYPE_ERROR_OFFSET of the wrong length")
            (offset,) = U64.unpack_from(data, ERROR.size + length)
            if not request.offset <= offset < request.offset + max(request.length, 1):
                raise ProtocolError(f"error offset {offset} lies outside the request")
        if not pending.error:
            pending.error, pending.message = from_nbd_errno(error), message

    def end(self) -> Reply | None:
        """The chunk (and its data) is in; the request's :class:`Reply` if it is done."""
        current = self._chunk
        assert current is not None, "end() follows header()"
        self._chunk = None
        if not current.done:
            return None
        pending = self._pending[current.cookie]
        request = pending.request
        if not pending.error:
            if (
                request.type == Cmd.READ
                and pending.covered != [(0, request.length)]
                and request.length
            ):
                raise ProtocolError("a read reported done before all its data came")
            if request.type == Cmd.BLOCK_STATUS and not pending.extents:
                raise ProtocolError("block status reported done without descriptors")
        del self._pending[current.cookie]
        return Reply(current.cookie, pending.error, pending.message, pending.extents)


class ReceiveBuffer:
    """Bytes received and not yet parsed, so that a few small headers cost one ``recv``;
    the caller fills :meth:`space` and says how much came with :meth:`filled`."""

    def __init__(self, size: int = 256 << 10) -> None:
        self._buf = bytearray(size)
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def space(self) -> memoryview:
        """Where the next bytes received go (compacting what is buffered first)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._buf[: self._end - self._start] = self._buf[self._start : self._end]
            self._end -= self._start
            self._start = 0
        return memoryview(self._buf)[self._end :]

    def filled(self, count: int) -> None:
        self._end += count

    def take(self, count: int) -> bytes | None:
        """``count`` buffered bytes, or None (and nothing taken) if fewer are here."""
        if self._end - self._start < count:
            return None
        self._start += count
        return bytes(self._buf[self._start - count : self._start])

    def take_into(self, view: memoryview) -> int:
        """Copy buffered bytes into ``view``; how many."""
        count = min(view.nbytes, self._end - self._start)
        view[:count] = self._buf[self._start : self._start + count]
        self._start += count
        return count


def unsent(parts: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of a message sent as ``parts`` (one ``sendmsg``) after ``sent`` bytes
    went: a header and its data leave in one call, and a partial send resumes here."""
    while parts and sent >= parts[0].nbytes:
        sent -= parts[0].nbytes
        parts = parts[1:]
    if sent:
        parts = [parts[0][sent:], *parts[1:]]
    return parts
