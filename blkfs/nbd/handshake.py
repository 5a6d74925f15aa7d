"""Fixed newstyle negotiation: a client's and a server's state machine, both driven by the
same loop (read ``want()`` bytes, hand them to ``receive()``, send what it returns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from blkfs.nbd.messages import (
    Cursor,
    ExportInfo,
    Negotiated,
    decode_string,
    encode_string,
    info_replies,
    info_request,
    meta_context_reply,
    meta_context_request,
    option,
    option_reply,
    parse_info,
    parse_info_request,
    parse_meta_context_request,
    server_reply,
)
from blkfs.nbd.values import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ERROR,
    U16,
    U32,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    ProtocolError,
    Refused,
    Rep,
    TransmissionFlag,
)


class _Exchange:
    """What both sides of the negotiation share: a step that takes exactly the bytes it
    wants and returns what to send."""

    _want: int
    _step: Callable[[bytes], bytes]

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def want(self) -> int:
        """How many bytes to read before the next :meth:`receive`."""
        return self._want

    def receive(self, data: bytes) -> bytes:
        """Take exactly :meth:`want` bytes; returns what to send next (may be empty)."""
        if len(data) != self._want or self.done:
            raise ValueError("receive() takes exactly want() bytes, until done")
        return self._step(data)


class ClientHandshake(_Exchange):
    """A client's fixed newstyle negotiation of one export: NBD_OPT_STARTTLS first if ``tls``,
    structured replies, then the metadata contexts asked for (if structured replies were
    agreed), then NBD_OPT_GO asking for block sizes; NBD_OPT_EXPORT_NAME where the server has
    no GO. An export the server refuses raises :class:`Refused` (listing the server's
    exports, if it lists them), as does a server that will not do TLS when asked or that
    demands it when not; send :meth:`abort` then.

    When ``upgrade`` turns true the server has agreed to TLS: the caller runs the TLS
    handshake over the connection, then sends what :meth:`secured` returns and goes on.
    """

    def __init__(
        self,
        export: str,
        *,
        structured: bool = True,
        contexts: Sequence[str] = (BASE_ALLOCATION,),
        tls: bool = False,
    ) -> None:
        self.export = export
        self.structured = structured
        self.contexts = tuple(contexts)
        self.tls = tls
        self.upgrade = False
        self._want = GREETING.size
        self._step = self._greeting
        self._reply = (0, 0)
        self._info = ExportInfo(export, 0, TransmissionFlag(0))
        self._seen_export = False
        self._structured = False
        self._selected: dict[str, int] = {}
        self._listed: list[str] = []
        self._refusal: Refused | None = None
        self._no_zeroes = False
        self.result: Negotiated | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def abort(self) -> bytes:
        """NBD_OPT_ABORT: how a client leaves a negotiation politely."""
        return option(Opt.ABORT)

    def _greeting(self, data: bytes) -> bytes:
        magic, opt_magic, flags = GREETING.unpack(data)
        if magic != NBDMAGIC:
            raise ProtocolError("not an NBD server (no NBDMAGIC)")
        if opt_magic != IHAVEOPT or not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("the server does not speak fixed newstyle negotiation")
        self._no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if self._no_zeroes else 0)
        first = self._send(Opt.STARTTLS) if self.tls else self._first()
        return CLIENT_FLAGS.pack(client) + first

    def _first(self) -> bytes:
        return self._send(Opt.STRUCTURED_REPLY) if self.structured else self._send_go()

    def secured(self) -> bytes:
        """The TLS handshake is done: the negotiation starts over inside it."""
        if not self.upgrade:
            raise ValueError("secured() follows the server's agreement to NBD_OPT_STARTTLS")
        self.upgrade = False
        return self._first()

    def _send(self, opt: Opt, data: bytes = b"") -> bytes:
        self._want, self._step = OPTION_REPLY.size, self._reply_header
        return option(opt, data)

    def _send_go(self) -> bytes:
        return self._send(Opt.GO, info_request(self.export, [Info.BLOCK_SIZE]))

    def _reply_header(self, data: bytes) -> bytes:
        magic, opt, reply, length = OPTION_REPLY.unpack(data)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(f"option reply of {length} bytes")
        self._reply = (opt, reply)
        self._want, self._step = length, self._reply_data
        return self._reply_data(b"") if length == 0 else b""

    def _reply_data(self, data: bytes) -> bytes:
        opt, reply = self._reply
        self._want, self._step = OPTION_REPLY.size, self._reply_header
        if reply == Rep.ERR_TLS_REQD:
            raise Refused(reply, "the server requires TLS (give tls-creds)")
        if opt == Opt.STARTTLS:
            return self._starttls(reply, data)
        if opt == Opt.STRUCTURED_REPLY:
            return self._structured_reply(reply)
        if opt == Opt.SET_META_CONTEXT:
            return self._meta_context(reply, data)
        if opt == Opt.GO:
            return self._go(reply, data)
        if opt == Opt.LIST and self._refusal is not None:
            return self._list(reply, data)
        raise ProtocolError(f"reply to option {opt}, which was not asked")

    def _starttls(self, reply: int, data: bytes) -> bytes:
        if reply != Rep.ACK:
            message = decode_string(data, "the error message") if reply & REP_ERROR else ""
            raise Refused(reply, f"the server does not do TLS ({message or f'reply {reply}'})")
        self.upgrade = True
        self._want, self._step = 0, _upgrading
        return b""

    def _structured_reply(self, reply: int) -> bytes:
        if reply == Rep.ACK:
            self._structured = True
            if self.contexts:
                return self._send(
                    Opt.SET_META_CONTEXT, meta_context_request(self.export, self.contexts)
                )
        elif not reply & REP_ERROR:
            raise ProtocolError(f"unexpected reply {reply} to NBD_OPT_STRUCTURED_REPLY")
        return self._send_go()

    def _meta_context(self, reply: int, data: bytes) -> bytes:
        if reply == Rep.META_CONTEXT:
            (context_id,) = Cursor(data, "NBD_REP_META_CONTEXT").unpack(U32)
            name = decode_string(data[U32.size :], "a metadata context name")
            if name not in self.contexts:
                raise ProtocolError(f"the server selected context '{name}', not asked for")
            self._selected[name] = context_id
            return b""
        if not reply & REP_ERROR and reply != Rep.ACK:
            raise ProtocolError(f"unexpected reply {reply} to NBD_OPT_SET_META_CONTEXT")
        if reply != Rep.ACK:
            self._selected.clear()  # an error selects nothing
        return self._send_go()

    def _go(self, reply: int, data: bytes) -> bytes:
        if reply == Rep.INFO:
            self._info = parse_info(data, self._info)
            self._seen_export |= data[: U16.size] == U16.pack(Info.EXPORT)
            return b""
        if reply == Rep.ACK:
            if not self._seen_export:
                raise ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
            return self._finish()
        if reply == Rep.ERR_UNSUP:  # an old server: the old way, which cannot fail politely
            self._want = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_PADDING)
            self._step = self._export_name_reply
            return option(Opt.EXPORT_NAME, encode_string(self.export))
        if not reply & REP_ERROR:
            raise ProtocolError(f"unexpected reply {reply} to NBD_OPT_GO")
        message = decode_string(data, "the error message") or f"error {reply & ~REP_ERROR}"
        self._refusal = Refused(reply, message)
        if reply == Rep.ERR_UNKNOWN:  # say what there is instead
            return self._send(Opt.LIST)
        raise self._refusal

    def _list(self, reply: int, data: bytes) -> bytes:
        assert self._refusal is not None
        if reply == Rep.SERVER:
            self._listed.append(Cursor(data, "NBD_REP_SERVER").string("an export name"))
            return b""
        raise Refused(
            self._refusal.reply, str(self._refusal), self._listed if reply == Rep.ACK else ()
        )

    def _export_name_reply(self, data: bytes) -> bytes:
        size, flags = EXPORT_NAME_REPLY.unpack(data[: EXPORT_NAME_REPLY.size])
        self._info = replace(self._info, size=size, flags=TransmissionFlag(flags))
        return self._finish()

    def _finish(self) -> bytes:
        self._want = 0
        self.result = Negotiated(self._info, self._structured, dict(self._selected))
        return b""


class Catalog:
    """What a server offers, as its handshake asks: override :meth:`lookup` and :meth:`list`.
    Both are plain functions of the server's state, so the handshake stays pure."""

    def lookup(self, name: str) -> ExportInfo:
        """The export a client asks for by ``name`` (possibly "", the default); raise
        :class:`Refused` (usually ``Rep.ERR_UNKNOWN``, with a message) if there is none."""
        raise Refused(Rep.ERR_UNKNOWN, f"no export named '{name}'")

    def list(self) -> list[ExportInfo]:
        return []


class ServerHandshake(_Exchange):
    """A server's side of fixed newstyle negotiation over a :class:`Catalog`.

    Start by sending :meth:`greeting`. Every option gets its reply; an unknown one
    NBD_REP_ERR_UNSUP, a bad one NBD_REP_ERR_INVALID. Ends with ``result`` set (NBD_OPT_GO
    or NBD_OPT_EXPORT_NAME succeeded: send what the last :meth:`receive` returned, then
    serve the export), or ``aborted`` (NBD_OPT_ABORT: send the ACK and hang up). A client
    that breaks the rules, floods options or asks NBD_OPT_EXPORT_NAME for an export there is
    not gets :class:`ProtocolError` (hang up).

    With ``tls`` the server requires TLS (the spec's FORCEDTLS): until NBD_OPT_STARTTLS has
    succeeded, every other option but NBD_OPT_ABORT is refused with NBD_REP_ERR_TLS_REQD
    (NBD_OPT_EXPORT_NAME, which cannot be refused, is hung up on). When ``upgrade`` turns
    true, send the reply, run the TLS handshake, then call :meth:`secured`; the negotiation
    starts over inside TLS, forgetting what was agreed before it."""

    def __init__(
        self, catalog: Catalog, contexts: Sequence[str] = (BASE_ALLOCATION,), tls: bool = False
    ) -> None:
        self.catalog = catalog
        self.contexts = tuple(contexts)
        self.tls = tls
        self.secure = False
        """TLS is up: NBD_OPT_STARTTLS succeeded and :meth:`secured` was called."""
        self.upgrade = False
        self._want = CLIENT_FLAGS.size
        self._step = self._client_flags
        self._option = 0
        self._options_seen = 0
        self._no_zeroes = False
        self._structured = False
        self._selected: tuple[str, dict[str, int]] | None = None
        """The export the last SET_META_CONTEXT was for, and what it selected."""
        self.result: Negotiated | None = None
        self.aborted = False

    @property
    def done(self) -> bool:
        return self.result is not None or self.aborted

    def greeting(self) -> bytes:
        return GREETING.pack(
            NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )

    def secured(self) -> bytes:
        """The TLS handshake that NBD_OPT_STARTTLS agreed to is done."""
        if not self.upgrade:
            raise ValueError("secured() follows an agreed NBD_OPT_STARTTLS")
        self.upgrade, self.secure = False, True
        self._structured, self._selected = False, None
        self._want, self._step = OPTION.size, self._option_header
        return b""

    def _client_flags(self, data: bytes) -> bytes:
        (flags,) = CLIENT_FLAGS.unpack(data)
        if flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {flags:#x}")
        self._no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._want, self._step = OPTION.size, self._option_header
        return b""

    def _option_header(self, data: bytes) -> bytes:
        magic, opt, length = OPTION.unpack(data)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise ProtocolError(f"more than {MAX_OPTIONS} options")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(f"option {opt} of {length} bytes")
        self._option = opt
        self._want, self._step = length, self._option_data
        return self._option_data(b"") if length == 0 else b""

    def _option_data(self, data: bytes) -> bytes:
        opt = self._option
        self._want, self._step = OPTION.size, self._option_header
        try:
            return self._answer(opt, data)
        except Refused as exc:
            return option_reply(opt, exc.reply, encode_string(str(exc)))

    def _answer(self, opt: int, data: bytes) -> bytes:
        if opt == Opt.ABORT:
            self.aborted = True
            return option_reply(opt, Rep.ACK)
        if opt == Opt.STARTTLS:
            return self._starttls(data)
        if self.tls and not self.secure:
            if opt == Opt.EXPORT_NAME:
                raise ProtocolError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: TLS is required")
            raise Refused(Rep.ERR_TLS_REQD, "this server requires TLS: NBD_OPT_STARTTLS first")
        if opt == Opt.EXPORT_NAME:
            return self._export_name(data)
        if opt in (Opt.LIST, Opt.STRUCTURED_REPLY) and data:
            raise Refused(Rep.ERR_INVALID, "this option takes no data")
        if opt == Opt.LIST:
            return b"".join(
                option_reply(opt, Rep.SERVER, server_reply(e.name, e.description))
                for e in self.catalog.list()
            ) + option_reply(opt, Rep.ACK)
        if opt == Opt.STRUCTURED_REPLY:
            self._structured = True
            return option_reply(opt, Rep.ACK)
        if opt in (Opt.INFO, Opt.GO):
            return self._info(opt, data)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            return self._meta_context(opt, data)
        raise Refused(Rep.ERR_UNSUP, f"option {opt} is not supported")

    def _starttls(self, data: bytes) -> bytes:
        if not self.tls:
            raise Refused(Rep.ERR_POLICY, "this server does not do TLS")
        if self.secure:
            raise Refused(Rep.ERR_INVALID, "TLS is already up")
        if data:
            raise Refused(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        self.upgrade = True
        self._want, self._step = 0, _upgrading
        return option_reply(Opt.STARTTLS, Rep.ACK)

    def _export(self, name: str) -> ExportInfo:
        export = self.catalog.lookup(name)
        flags = export.flags | TransmissionFlag.HAS_FLAGS
        if self._structured:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~TransmissionFlag.SEND_DF
        return replace(export, flags=flags)

    def _export_name(self, data: bytes) -> bytes:
        name = decode_string(data, "the export name")
        try:
            export = self._export(name)
        except Refused as exc:  # this option has no error reply: hang up
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME: {exc}") from None
        self.result = Negotiated(export, self._structured, self._contexts(name))
        return EXPORT_NAME_REPLY.pack(export.size, export.flags) + (
            b"" if self._no_zeroes else bytes(EXPORT_NAME_PADDING)
        )

    def _info(self, opt: int, data: bytes) -> bytes:
        try:
            name, infos = parse_info_request(data)
        except ProtocolError as exc:
            raise Refused(Rep.ERR_INVALID, str(exc)) from None
        export = self._export(name)
        reply = info_replies(opt, export, infos) + option_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self.result = Negotiated(export, self._structured, self._contexts(name))
        return reply

    def _contexts(self, name: str) -> dict[str, int]:
        """The contexts selected for ``name``: the last SET_META_CONTEXT counts, and only if
        it named the export the client then went to."""
        if self._selected is None or self._selected[0] != name:
            return {}
        return self._selected[1]

    def _meta_context(self, opt: int, data: bytes) -> bytes:
        if opt == Opt.SET_META_CONTEXT:
            self._selected = None  # replaced even if this fails
        if not self._structured:
            raise Refused(Rep.ERR_INVALID, "negotiate structured replies first")
        try:
            name, queries = parse_meta_context_request(data)
        except ProtocolError as exc:
            raise Refused(Rep.ERR_INVALID, str(exc)) from None
        if any(":" not in query for query in queries):
            raise Refused(Rep.ERR_INVALID, "a metadata context query needs a namespace")
        export = self._export(name)  # refuses an unknown export
        listing = opt == Opt.LIST_META_CONTEXT
        found = [
            c
            for c in self.contexts + export.meta_contexts
            if (listing and not queries) or any(_matches(q, c, listing) for q in queries)
        ]
        selected = {context: number for number, context in enumerate(found, 1)}
        if not listing:
            self._selected = (name, selected)
        return b"".join(
            option_reply(
                opt, Rep.META_CONTEXT, meta_context_reply(0 if listing else number, context)
            )
            for context, number in selected.items()
        ) + option_reply(opt, Rep.ACK)


def _upgrading(data: bytes) -> bytes:
    raise ValueError("the TLS handshake comes first: then secured()")


def _matches(query: str, context: str, listing: bool) -> bool:
    """Whether ``query`` selects ``context``: its full name, or (when listing) its namespace
    with an empty leaf name, the spec's wildcard."""
    return query == context or (listing and query.endswith(":") and context.startswith(query))
