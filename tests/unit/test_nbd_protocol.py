"""The NBD protocol without sockets: both handshakes against each other, every message round
trip, replies checked against requests, and garbage that never raises anything but a
protocol error."""

from __future__ import annotations

import dataclasses
import errno
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs import nbd
from blkfs.nbd import (
    BASE_ALLOCATION,
    Catalog,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    CmdFlag,
    ExportInfo,
    Negotiated,
    ProtocolError,
    Refused,
    Rep,
    Request,
    ServerHandshake,
    State,
    TransmissionFlag,
)

FLAGS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
)
SIZE = 1 << 20


class Two(Catalog):
    def lookup(self, name: str) -> ExportInfo:
        if name not in ("disk0", "cd0"):
            raise Refused(Rep.ERR_UNKNOWN, f"no export '{name}'")
        flags = FLAGS if name == "disk0" else TransmissionFlag.READ_ONLY
        return ExportInfo(name, SIZE, flags, 1, 4096, 1 << 25, f"the {name}")

    def list(self) -> list[ExportInfo]:
        return [self.lookup("disk0"), self.lookup("cd0")]


class One(Two):
    def lookup(self, name: str) -> ExportInfo:
        return super().lookup(name or "disk0")

    def list(self) -> list[ExportInfo]:
        return [self.lookup("disk0")]


def converse(client: ClientHandshake, server: ServerHandshake) -> None:
    """Run both state machines against each other until neither can go on."""
    to_client, to_server = bytearray(server.greeting()), bytearray()
    while True:
        if not client.done and len(to_client) >= client.want():
            data = bytes(to_client[: client.want()])
            del to_client[: len(data)]
            to_server += client.receive(data)
        elif not server.done and len(to_server) >= server.want():
            data = bytes(to_server[: server.want()])
            del to_server[: len(data)]
            to_client += server.receive(data)
        else:
            return


@pytest.mark.parametrize("structured", [True, False])
def test_go_agrees_on_the_export_its_flags_and_contexts(structured: bool) -> None:
    client, server = ClientHandshake("disk0", structured=structured), ServerHandshake(Two())
    converse(client, server)
    assert client.result is not None and server.result is not None
    assert client.result == dataclasses.replace(
        server.result, export=dataclasses.replace(server.result.export, description="")
    )
    export = client.result.export
    assert (export.name, export.size, export.max_payload) == ("disk0", SIZE, 1 << 25)
    assert export.flags & FLAGS == FLAGS and export.flags & TransmissionFlag.HAS_FLAGS
    assert bool(export.flags & TransmissionFlag.SEND_DF) == structured
    assert client.result.structured == structured
    assert client.result.contexts == ({BASE_ALLOCATION: 1} if structured else {})


def test_the_empty_name_is_the_default_export() -> None:
    client, server = ClientHandshake(""), ServerHandshake(One())
    converse(client, server)
    assert client.result is not None and client.result.export.size == SIZE


def test_an_unknown_export_is_refused_with_the_list_of_what_there_is() -> None:
    client, server = ClientHandshake("disk9"), ServerHandshake(Two())
    with pytest.raises(Refused) as refused:
        converse(client, server)
    assert refused.value.reply == Rep.ERR_UNKNOWN
    assert "disk9" in str(refused.value)
    assert refused.value.exports == ("disk0", "cd0")
    assert not server.done  # the client may still abort, or try another name


def test_abort_ends_a_negotiation() -> None:
    server = ServerHandshake(Two())
    server.receive(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.C_FIXED_NEWSTYLE))
    reply = server.receive(nbd.option(nbd.Opt.ABORT))
    assert server.aborted and server.done
    assert nbd.OPTION_REPLY.unpack(reply) == (nbd.OPTION_REPLY_MAGIC, nbd.Opt.ABORT, Rep.ACK, 0)


def test_a_client_falls_back_to_export_name_on_a_server_without_go() -> None:
    client = ClientHandshake("disk0", structured=False)
    sent = client.receive(
        nbd.GREETING.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.HandshakeFlag.FIXED_NEWSTYLE)
    )
    assert nbd.OPTION.unpack_from(sent, 4)[1] == nbd.Opt.GO
    client.receive(nbd.option_reply(nbd.Opt.GO, Rep.ERR_UNSUP))
    assert client.want() == nbd.EXPORT_NAME_REPLY.size + nbd.EXPORT_NAME_PADDING
    client.receive(nbd.EXPORT_NAME_REPLY.pack(SIZE, 1) + bytes(nbd.EXPORT_NAME_PADDING))
    assert client.result is not None and client.result.export.size == SIZE


def test_meta_contexts_list_and_select_base_allocation_only() -> None:
    server = ServerHandshake(Two())
    server.receive(nbd.CLIENT_FLAGS.pack(1))
    replies = []

    def ask(opt: nbd.Opt, data: bytes = b"") -> list[tuple[int, bytes]]:
        out = server.receive(nbd.option(opt, data)[: nbd.OPTION.size])
        if data:
            out = server.receive(data)
        found, at = [], 0
        while at < len(out):
            _, _, kind, length = nbd.OPTION_REPLY.unpack_from(out, at)
            at += nbd.OPTION_REPLY.size
            found.append((kind, out[at : at + length]))
            at += length
        return found

    assert (
        ask(nbd.Opt.SET_META_CONTEXT, nbd.meta_context_request("disk0", [BASE_ALLOCATION]))[0][0]
        == Rep.ERR_INVALID
    )  # structured replies first
    ask(nbd.Opt.STRUCTURED_REPLY)
    replies = ask(nbd.Opt.LIST_META_CONTEXT, nbd.meta_context_request("disk0", ["base:"]))
    assert replies == [
        (Rep.META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
        (Rep.ACK, b""),
    ]
    replies = ask(
        nbd.Opt.SET_META_CONTEXT,
        nbd.meta_context_request("disk0", ["base:", "qemu:dirty-bitmap:x", BASE_ALLOCATION]),
    )
    assert replies == [
        (Rep.META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (Rep.ACK, b""),
    ]
    assert (
        ask(nbd.Opt.SET_META_CONTEXT, nbd.meta_context_request("disk0", ["nocolon"]))[0][0]
        == Rep.ERR_INVALID
    )
    assert (
        ask(nbd.Opt.LIST_META_CONTEXT, nbd.meta_context_request("nope", []))[0][0]
        == Rep.ERR_UNKNOWN
    )
    assert ask(nbd.Opt.STARTTLS)[0][0] == Rep.ERR_POLICY  # as qemu-nbd without TLS
    assert ask(nbd.Opt.LIST, b"x")[0][0] == Rep.ERR_INVALID


def test_a_server_hangs_up_on_floods_and_bad_flags() -> None:
    server = ServerHandshake(Two())
    with pytest.raises(ProtocolError):
        server.receive(nbd.CLIENT_FLAGS.pack(0x80))
    server = ServerHandshake(Two())
    server.receive(nbd.CLIENT_FLAGS.pack(1))
    with pytest.raises(ProtocolError):
        server.receive(nbd.OPTION.pack(nbd.IHAVEOPT, nbd.Opt.GO, 1 << 30))
    server = ServerHandshake(Two())
    server.receive(nbd.CLIENT_FLAGS.pack(1))
    with pytest.raises(ProtocolError):
        for _ in range(nbd.MAX_OPTIONS + 1):
            server.receive(nbd.option(77))
    server = ServerHandshake(Two())
    server.receive(nbd.CLIENT_FLAGS.pack(1))
    with pytest.raises(ProtocolError):  # the old way has no error reply: hang up
        server.receive(nbd.OPTION.pack(nbd.IHAVEOPT, nbd.Opt.EXPORT_NAME, 5))
        server.receive(b"disk9")


# -- round trips ------------------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
)
def test_request_round_trip(flags: int, kind: int, cookie: int, offset: int, length: int) -> None:
    request = Request(flags, kind, cookie, offset, length)
    assert nbd.parse_request(request.pack()) == request


@given(names, st.lists(st.sampled_from(list(nbd.Info)), max_size=4))
def test_info_request_round_trip(name: str, infos: list[nbd.Info]) -> None:
    assert nbd.parse_info_request(nbd.info_request(name, infos)) == (name, infos)


@given(names, st.lists(names, max_size=5))
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    assert nbd.parse_meta_context_request(nbd.meta_context_request(name, queries)) == (
        name,
        queries,
    )


@given(
    names,
    st.integers(0, 2**63),
    st.integers(0, 0xFFFF),
    st.integers(0, 16),
    st.integers(0, 4),
    names,
)
def test_info_replies_round_trip(
    name: str, size: int, flags: int, minimum: int, extra: int, description: str
) -> None:
    export = ExportInfo(
        name,
        size,
        TransmissionFlag(flags),
        1 << minimum,
        1 << max(minimum + extra, 9),
        1 << 25,
        description,
    )
    replies = nbd.info_replies(nbd.Opt.GO, export, [nbd.Info.NAME, nbd.Info.DESCRIPTION])
    parsed, at = ExportInfo("", 0, TransmissionFlag(0)), 0
    while at < len(replies):
        _, _, kind, length = nbd.OPTION_REPLY.unpack_from(replies, at)
        at += nbd.OPTION_REPLY.size
        assert kind == Rep.INFO
        parsed = nbd.parse_info(replies[at : at + length], parsed)
        at += length
    assert parsed == (
        export
        if description
        else ExportInfo(name, size, export.flags, export.min_block, export.preferred_block, 1 << 25)
    )


def negotiated(structured: bool = True) -> Negotiated:
    flags = FLAGS | (TransmissionFlag.SEND_DF if structured else 0)
    return Negotiated(
        ExportInfo("d", SIZE, flags), structured, {BASE_ALLOCATION: 7} if structured else {}
    )


def deliver(transmission: ClientTransmission, wire: bytes) -> list[nbd.Reply]:
    """Feed server bytes through the three steps, as a client's receive loop does (which
    waits for more where the bytes run out; here, that is the end)."""
    replies, at = [], 0

    def take(count: int) -> bytes:
        nonlocal at
        if at + count > len(wire):
            raise EOFError
        at += count
        return wire[at - count : at]

    try:
        while at < len(wire):
            magic = take(4)
            header = magic + take(transmission.header_size(magic) - 4)
            into = transmission.payload(take(transmission.header(header)))
            if into is not None:
                into[:] = take(into.nbytes)
            reply = transmission.end()
            if reply is not None:
                replies.append(reply)
    except EOFError:
        pass
    return replies


@given(st.binary(min_size=1, max_size=2048), st.randoms(use_true_random=False))
def test_a_read_reassembles_from_chunks_in_any_order(data: bytes, rng: random.Random) -> None:
    transmission = ClientTransmission(negotiated())
    buf = memoryview(bytearray(b"\xee" * len(data)))
    cookie, _ = transmission.request(Cmd.READ, 1000, len(data), buf=buf)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 5))) if len(data) > 1 else []
    pieces = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
    rng.shuffle(pieces)
    wire = b""
    for start, end in pieces:
        if not any(data[start:end]):
            wire += nbd.offset_hole(cookie, 1000 + start, end - start, done=False)
        else:
            wire += nbd.offset_data(cookie, 1000 + start, end - start, done=False) + data[start:end]
    wire += nbd.none_chunk(cookie)
    assert deliver(transmission, wire) == [nbd.Reply(cookie)]
    assert bytes(buf) == data
    assert transmission.in_flight == 0


def test_replies_come_back_out_of_order_matched_by_cookie() -> None:
    transmission = ClientTransmission(negotiated())
    flush, _ = transmission.request(Cmd.FLUSH)
    status, _ = transmission.request(Cmd.BLOCK_STATUS, 0, 8192, CmdFlag.REQ_ONE)
    write, _ = transmission.request(Cmd.WRITE, 0, 512, CmdFlag.FUA)
    wire = (
        nbd.error_chunk(write, nbd.Errno.ENOSPC, "full")
        + nbd.block_status(status, 7, [(4096, State.HOLE | State.ZERO)])
        + nbd.simple_reply(flush)
    )
    assert deliver(transmission, wire) == [
        nbd.Reply(write, errno.ENOSPC, "full"),
        nbd.Reply(status, extents=((4096, 3),)),
        nbd.Reply(flush),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        lambda c: nbd.simple_reply(c + 1),  # a wrong cookie
        lambda c: nbd.offset_data(c, 4096 + 4000, 200, done=True) + bytes(200),  # past the end
        lambda c: nbd.offset_data(c, 100, 10, done=True) + bytes(10),  # before the start
        lambda c: nbd.chunk(c, nbd.ReplyType.OFFSET_DATA, b"", length=1 << 31),  # oversized
        lambda c: nbd.offset_hole(c, 4096, 0, done=True),  # an empty hole
        lambda c: nbd.block_status(c, 7, [(10, 0)]),  # not for a read
        lambda c: nbd.chunk(c, nbd.ReplyType.NONE, done=False),  # NONE not last
        lambda c: nbd.chunk(c, 77, b"x"),  # unknown type
        nbd.simple_reply,  # simple to a read
        lambda c: struct.pack(">IHHQI", 0x12345678, 1, 0, c, 0),  # bad magic
        lambda c: nbd.chunk(c, nbd.ReplyType.ERROR, nbd.ERROR.pack(5, 100) + b"short"),
        lambda c: nbd.chunk(c, nbd.ReplyType.ERROR, nbd.ERROR.pack(0, 0)),  # error 0
    ],
)
def test_a_bad_reply_is_a_protocol_error_and_changes_nothing(bad) -> None:
    transmission = ClientTransmission(negotiated())
    buf = memoryview(bytearray(4096))
    cookie, _ = transmission.request(Cmd.READ, 4096, 4096, buf=buf)
    with pytest.raises(ProtocolError):
        deliver(transmission, bad(cookie))
    assert transmission.in_flight == 1
    good = nbd.offset_data(cookie, 4096, 4096, done=True) + b"z" * 4096
    assert deliver(transmission, good) == [nbd.Reply(cookie)]
    assert bytes(buf) == b"z" * 4096


@pytest.mark.parametrize(
    "chunks",
    [
        lambda c: (
            nbd.offset_hole(c, 4096, 4096, done=False) + nbd.offset_hole(c, 8000, 10, done=True)
        ),
        lambda c: nbd.offset_hole(c, 4096, 100, done=True),  # done too early
        lambda c: nbd.offset_hole(c, 4096, 100, done=False) + nbd.none_chunk(c),
    ],
)
def test_overlapping_or_missing_read_chunks_are_protocol_errors(chunks) -> None:
    transmission = ClientTransmission(negotiated())
    cookie, _ = transmission.request(Cmd.READ, 4096, 4096, buf=memoryview(bytearray(4096)))
    with pytest.raises(ProtocolError):
        deliver(transmission, chunks(cookie))


def test_a_cancelled_read_never_writes_into_the_callers_buffer() -> None:
    transmission = ClientTransmission(negotiated())
    buf = memoryview(bytearray(512))
    cookie, _ = transmission.request(Cmd.READ, 0, 512, buf=buf)
    transmission.forget(cookie)
    deliver(transmission, nbd.offset_data(cookie, 0, 512, done=True) + b"y" * 512)
    assert bytes(buf) == bytes(512)


def test_asking_what_was_not_negotiated_is_a_bug() -> None:
    transmission = ClientTransmission(negotiated(structured=False))
    with pytest.raises(ValueError):
        transmission.request(Cmd.BLOCK_STATUS, 0, 10)
    with pytest.raises(ValueError):
        transmission.request(Cmd.READ, 0, 10, CmdFlag.DF, buf=memoryview(bytearray(10)))


@pytest.mark.parametrize(
    "request_, expected",
    [
        (Request(0, Cmd.READ, 1, SIZE - 10, 10), None),
        (Request(0, Cmd.READ, 1, SIZE - 10, 11), nbd.Errno.EINVAL),
        (Request(0, Cmd.WRITE, 1, SIZE, 1), nbd.Errno.ENOSPC),
        (Request(0, Cmd.WRITE_ZEROES, 1, SIZE, 1), nbd.Errno.ENOSPC),
        (Request(0, Cmd.TRIM, 1, SIZE, 1), nbd.Errno.EINVAL),
        (Request(0, Cmd.READ, 1, 0, (32 << 20) + 1), nbd.Errno.EINVAL),
        (Request(0, Cmd.CACHE, 1, 0, 1), nbd.Errno.EINVAL),
        (Request(0, 99, 1, 0, 1), nbd.Errno.EINVAL),
        (Request(CmdFlag.NO_HOLE, Cmd.WRITE, 1, 0, 1), nbd.Errno.EINVAL),
        (Request(0x100, Cmd.READ, 1, 0, 1), nbd.Errno.EINVAL),
        (Request(CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE, Cmd.WRITE_ZEROES, 1, 0, 1), None),
        (Request(CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS, 1, 0, SIZE), None),
        (Request(0, Cmd.FLUSH, 1, 1, 0), nbd.Errno.EINVAL),
        (Request(0, Cmd.FLUSH, 1, 0, 0), None),
    ],
)
def test_check_request(request_: Request, expected: nbd.Errno | None) -> None:
    refusal = nbd.check_request(request_, negotiated())
    assert (refusal and refusal[0]) == expected


def test_read_only_exports_refuse_writes_with_eperm() -> None:
    read_only = Negotiated(ExportInfo("d", SIZE, TransmissionFlag.READ_ONLY), True, {})
    for kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert nbd.check_request(Request(0, kind, 1, 0, 1), read_only)[0] == nbd.Errno.EPERM
    assert (
        nbd.check_request(Request(0, Cmd.BLOCK_STATUS, 1, 0, 1), read_only)[0] == nbd.Errno.EINVAL
    )  # no context selected


def test_errno_mapping() -> None:
    assert nbd.to_nbd_errno(errno.EROFS) == nbd.Errno.EPERM
    assert nbd.to_nbd_errno(errno.EDQUOT) == nbd.Errno.ENOSPC
    assert nbd.to_nbd_errno(errno.ENOMEDIUM) == nbd.Errno.EIO
    assert nbd.to_nbd_errno(errno.EOPNOTSUPP) == nbd.Errno.ENOTSUP
    assert all(nbd.from_nbd_errno(value) == value for value in nbd.Errno)
    assert nbd.from_nbd_errno(1234) == errno.EINVAL


def test_merge_extents() -> None:
    assert nbd.merge_extents([(1, 0), (2, 0), (3, 3), (4, 0)]) == [(3, 0), (3, 3), (4, 0)]


# -- garbage ----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_garbage_to_a_server_is_at_most_a_protocol_error(garbage: bytes) -> None:
    server = ServerHandshake(Two())
    server.greeting()
    at = 0
    try:
        while not server.done and at + server.want() <= len(garbage):
            chunk = garbage[at : at + server.want()]
            at += len(chunk)
            server.receive(chunk)
    except ProtocolError:
        pass


@settings(max_examples=300)
@given(
    st.sampled_from(
        [
            b"",
            nbd.CLIENT_FLAGS.pack(1),
            nbd.CLIENT_FLAGS.pack(1) + nbd.option(nbd.Opt.STRUCTURED_REPLY),
        ]
    ),
    st.lists(st.tuples(st.sampled_from([*nbd.Opt, 0, 99]), st.binary(max_size=64)), max_size=6),
)
def test_options_with_garbage_data_get_replies_not_exceptions(prefix: bytes, options) -> None:
    server = ServerHandshake(Two())
    wire = prefix or nbd.CLIENT_FLAGS.pack(1)
    wire += b"".join(nbd.option(opt, data) for opt, data in options)
    at = 0
    try:
        while not server.done and at + server.want() <= len(wire):
            chunk = wire[at : at + server.want()]
            at += len(chunk)
            server.receive(chunk)
    except ProtocolError:
        pass  # NBD_OPT_EXPORT_NAME of an unknown export: the one hang-up allowed


@settings(max_examples=300)
@given(st.binary(max_size=600), st.booleans())
def test_garbage_to_a_client_is_at_most_a_protocol_error(garbage: bytes, greeted: bool) -> None:
    client = ClientHandshake("disk0")
    if greeted:
        garbage = nbd.GREETING.pack(nbd.NBDMAGIC, nbd.IHAVEOPT, 3) + garbage
    at = 0
    try:
        while not client.done and at + client.want() <= len(garbage):
            chunk = garbage[at : at + client.want()]
            at += len(chunk)
            client.receive(chunk)
    except (ProtocolError, Refused):
        pass


replies = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 7), st.integers(0, 1 << 32 - 1)).map(
            lambda r: nbd.simple_reply(r[0], r[1])
        ),
        st.tuples(
            st.integers(0, 3),
            st.sampled_from([*nbd.ReplyType, 3, 0x8003, 0xFFFF]),
            st.integers(0, 7),
            st.binary(max_size=80),
        ).map(
            lambda r: nbd.CHUNK.pack(nbd.STRUCTURED_REPLY_MAGIC, r[0], r[1], r[2], len(r[3])) + r[3]
        ),
        st.binary(max_size=40),
    ),
    max_size=8,
).map(b"".join)
"""Replies to the requests in flight (cookies 1 to 5) with random types, flags and
payloads, and now and then plain garbage."""


@settings(max_examples=1000)
@given(replies, st.booleans())
def test_garbage_replies_are_at_most_a_protocol_error(wire: bytes, structured: bool) -> None:
    transmission = ClientTransmission(negotiated(structured))
    for _ in range(3):
        transmission.request(Cmd.READ, 0, 64, buf=memoryview(bytearray(64)))
    transmission.request(Cmd.FLUSH)
    if structured:
        transmission.request(Cmd.BLOCK_STATUS, 0, 64)
    try:
        deliver(transmission, wire)
    except ProtocolError:
        pass


@given(st.binary(min_size=28, max_size=28), st.booleans())
def test_any_request_is_parsed_and_checked_without_an_exception(
    data: bytes, structured: bool
) -> None:
    try:
        request = nbd.parse_request(data)
    except ProtocolError:
        return
    refusal = nbd.check_request(request, negotiated(structured))
    assert refusal is None or isinstance(refusal[1], str)


@given(st.lists(st.binary(max_size=20), max_size=5), st.data())
def test_unsent_is_what_follows_the_bytes_sent(parts: list[bytes], data: st.DataObject) -> None:
    whole = b"".join(parts)
    sent = data.draw(st.integers(0, len(whole)))
    rest = nbd.unsent([memoryview(p) for p in parts], sent)
    assert b"".join(bytes(p) for p in rest) == whole[sent:]
