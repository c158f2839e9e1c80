"""ServerConnection: the server role of NBD, from greeting to the last reply, without doing any I/O.

The driver (a backend, or any code that owns a socket) feeds the client's bytes to ``receive_data``, takes
events from ``next_event`` and answers them with ``send``, and writes out whatever ``data_to_send`` returns.

What the application sees is deliberately small: the engine answers every option itself, asking the
application only which exports exist (``ExportRequested`` -> ``Export`` / ``ExportUnknown``); it validates every
request and answers invalid ones itself, so the application only ever sees requests it can carry out; and it
turns the application's replies into simple, structured or extended reply messages as negotiated.

The application's side of the seed contract: ``exports`` is the offer list answered to NBD_OPT_LIST (None
answers NBD_REP_ERR_POLICY, the spec's way of saying EPERM); the chosen name arrives in ``ExportRequested``;
NBD_OPT_ABORT surfaces as ``ClientAborted``; exports are read-only unless the application's ``Export`` says
otherwise (the ``export_for`` helper defaults to read-only); the TLS mode is the driver's choice (backends
force TLS when they are given a certificate).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from . import _headers as h
from . import _replies as r
from . import _wire as w
from ._constants import (
    MAX_OPTION_LENGTH,
    MAX_STRING_LENGTH,
    ClientFlags,
    Command,
    CommandFlags,
    Errno,
    HandshakeFlags,
    InfoType,
    Option,
    OptionReplyType,
    TransmissionFlags,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    BlockStatusReply,
    BlockStatusRequest,
    CacheRequest,
    ClientAborted,
    ConnectionClosed,
    DisconnectRequest,
    ErrorReply,
    Event,
    Export,
    ExportListing,
    ExportRequested,
    ExportUnknown,
    Extent,
    FlushRequest,
    HandshakeComplete,
    ReadData,
    ReadHole,
    ReadRequest,
    ResizeRequest,
    StartTLS,
    SuccessReply,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from ._metacontexts import match_meta_contexts
from ._receivebuffer import ReceiveBuffer
from ._state import NEED_DATA, PAUSED, Phase, TlsMode

__all__ = ["ServerConnection"]

_REP = OptionReplyType
_KNOWN_CLIENT_FLAGS = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)  # an int: ~IntFlag drops unknown bits

# Which request flags each command may carry (spec: "Command flags"); PAYLOAD_LEN is checked separately.
_FUA, _NO_HOLE, _DF, _REQ_ONE, _FAST_ZERO, _PAYLOAD_LEN = (int(f) for f in CommandFlags)
_ALLOWED_FLAGS = {
    Command.READ: _DF,
    Command.WRITE: _FUA,
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: _FUA,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: _FUA | _NO_HOLE | _FAST_ZERO,
    Command.BLOCK_STATUS: _REQ_ONE,
    Command.RESIZE: 0,
}
# The transmission flag that must be advertised before a command or flag may be used.
_NEEDS_FLAG = {
    Command.FLUSH: TransmissionFlags.SEND_FLUSH,
    Command.TRIM: TransmissionFlags.SEND_TRIM,
    Command.CACHE: TransmissionFlags.SEND_CACHE,
    Command.WRITE_ZEROES: TransmissionFlags.SEND_WRITE_ZEROES,
    Command.RESIZE: TransmissionFlags.SEND_RESIZE,
}
_WRITES = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES, Command.RESIZE})
_RANGED = frozenset(
    {Command.READ, Command.WRITE, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS}
)
_READ, _WRITE, _DISC, _BLOCK_STATUS = Command.READ, Command.WRITE, Command.DISC, Command.BLOCK_STATUS
_MAX_DESCRIPTORS = 1 << 20  # spec: a server SHOULD NOT send more than 2^20 descriptors in one chunk


class _InFlight:
    """What the server remembers of a request until its reply is complete."""

    __slots__ = ("command", "offset", "length", "flags", "covered", "started", "context_ids", "ranges")

    def __init__(self, command: int, offset: int, length: int, flags: int) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.covered = 0  # bytes of a read's reply already sent (data and holes)
        self.started = False  # a reply chunk was sent already
        self.context_ids: tuple[int, ...] = ()
        self.ranges: list[tuple[int, int]] | None = None  # chunks sent, once a read has more than one


class ServerConnection:
    """The server side of one NBD connection (fixed newstyle handshake, then transmission).

    ``exports``: the names (or ``ExportListing``s with descriptions) answered to NBD_OPT_LIST, or None to
    refuse listing with NBD_REP_ERR_POLICY. ``tls``: the TLS mode (spec: "Server-side requirements").
    ``structured_replies`` / ``extended_headers``: whether the server agrees to those options (turn them off to
    behave like an older server). The greeting is queued at once: call ``data_to_send()`` before reading.
    """

    def __init__(
        self,
        *,
        exports: Iterable[str | ExportListing] | None = None,
        tls: TlsMode = TlsMode.NOTLS,
        structured_replies: bool = True,
        extended_headers: bool = True,
    ) -> None:
        self._offer = (
            None
            if exports is None
            else tuple(e if isinstance(e, ExportListing) else ExportListing(e) for e in exports)
        )
        self.tls_mode = tls
        self._allow_structured = structured_replies
        self._allow_extended = extended_headers and structured_replies
        self._buf = ReceiveBuffer()
        self._out: list[bytes | bytearray | memoryview] = []
        self._events: deque[Event] = deque()
        self._phase = Phase.GREETING
        self._eof = False
        self._fixed = False
        self._no_zeroes = False
        self._tls_active = False
        self._skip = 0  # bytes of a refused option payload still to discard
        self._reset_negotiation()
        # The option waiting on the application's answer to ExportRequested: (option, payload fields).
        self._pending: tuple[Option, dict[str, object]] | None = None
        # Transmission state.
        self.export: Export | None = None
        self._size = 0
        self._flags = 0
        self._min_block = 1
        self._max_payload = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._disconnecting = False
        self._request_codec = h.REQUEST
        self._out.append(
            w.encode(w.NewstyleGreeting, {"handshake_flags": HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES})
        )

    def _reset_negotiation(self) -> None:
        # Everything the spec says a successful STARTTLS makes the server forget.
        self.structured_replies = False
        self.extended_headers = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}

    # --- The driver's interface --------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where the connection is (see ``nbdproto._state``)."""
        return self._phase

    @property
    def tls_active(self) -> bool:
        """True once the driver reported the TLS upgrade done."""
        return self._tls_active

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        """The meta contexts agreed for transmission: id -> name."""
        return self._meta_contexts

    @property
    def in_flight(self) -> int:
        """Requests handed to the application whose replies are not complete yet."""
        return len(self._in_flight)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the client; ``b""`` means the client closed its end."""
        if self._phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed; it takes no more data")
        if not data:
            self._eof = True
            return
        if self._phase is Phase.CLOSED:
            return
        if self._phase is Phase.TLS_UPGRADE:
            self._fail("client sent plaintext after NBD_OPT_STARTTLS was accepted, before the TLS handshake")
        skip = self._skip
        if skip:
            # Discard a refused option's payload as it arrives, without buffering it.
            taken = min(skip, len(data))
            self._skip = skip - taken
            data = data[taken:]
            if not data:
                return
        self._buf.append(data)

    def next_event(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        """The next event the client's bytes caused, NEED_DATA if more bytes are needed, or PAUSED while the
        connection waits on the driver (an ExportRequested to answer, a TLS upgrade, replies still owed after
        NBD_CMD_DISC). Once the connection is over it returns ``ConnectionClosed``. Raises RemoteProtocolError
        when the client broke a rule that ends the connection."""
        if self._events:
            return self._events.popleft()
        phase = self._phase
        try:
            if phase is Phase.TRANSMISSION:
                return self._next_request()
            if phase is Phase.OPTIONS:
                return self._next_option()
            if phase is Phase.GREETING:
                return self._next_client_flags()
        except RemoteProtocolError:
            self._phase = Phase.ERROR
            raise
        if phase is Phase.CLOSED:
            return ConnectionClosed()
        if phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed")
        return PAUSED

    def send(self, event: Event) -> None:
        """Answer the client: ``Export`` / ``ExportUnknown`` for an ExportRequested, or a reply to a request
        (``ReadData``, ``ReadHole``, ``BlockStatusReply``, ``SuccessReply``, ``ErrorReply``). Raises
        LocalProtocolError when the event is not allowed now or does not fit the request it answers."""
        if self._phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed")
        try:
            if isinstance(event, (ReadData, ReadHole, SuccessReply, ErrorReply, BlockStatusReply)):
                self._send_reply(event)
            elif isinstance(event, (Export, ExportUnknown)):
                self._answer_export(event)
            else:
                raise LocalProtocolError(f"a server cannot send {type(event).__name__}")
        except LocalProtocolError:
            self._phase = Phase.ERROR
            raise

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Take the pieces queued for the client, in order (payloads are separate pieces, for sendmsg)."""
        out = self._out
        self._out = []
        return out

    def tls_established(self) -> None:
        """The driver finished the TLS handshake after a StartTLS event; option haggling resumes under TLS."""
        if self._phase is not Phase.TLS_UPGRADE:
            raise LocalProtocolError(f"tls_established() called in phase {self._phase.value}, not after StartTLS")
        self._tls_active = True
        self._reset_negotiation()
        self._phase = Phase.OPTIONS

    # --- Handshake -----------------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self._phase = Phase.ERROR
        raise RemoteProtocolError(message)

    def _closed_or_need_data(self) -> Event | type[NEED_DATA]:
        if self._eof:
            self._phase = Phase.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _next_client_flags(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        if len(self._buf) < 4:
            return self._closed_or_need_data()
        flags = w.decode(w.ClientFlagsMessage, self._buf.take(4)).client_flags
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # spec: a server that receives client flags it does not know MUST close the connection.
            self._fail(f"client flags {flags:#x} include unknown bits {flags & ~_KNOWN_CLIENT_FLAGS:#x}")
        self._fixed = bool(flags & ClientFlags.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlags.NO_ZEROES)
        self._phase = Phase.OPTIONS
        return self._next_option()

    def _reply(self, option: int, reply_type: int, payload: bytes = b"") -> None:
        self._out.append(r.option_reply(option, reply_type, payload))

    def _error(self, option: int, reply_type: OptionReplyType, message: str) -> None:
        self._reply(option, reply_type, w.encode(w.ErrorReplyPayload, {"message": message}))

    def _next_option(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        while True:
            if self._skip:
                return self._closed_or_need_data()
            header = buf.header(h.OPTION_REQUEST)
            if header is None:
                return self._closed_or_need_data()
            magic, option, length = header
            if magic != h.OPTION_REQUEST.magic:
                self._fail(f"option request magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_LENGTH:
                if option == Option.EXPORT_NAME or not self._fixed:
                    self._fail(f"option {option} length {length} exceeds the {MAX_OPTION_LENGTH}-byte option limit")
                buf.skip(h.OPTION_REQUEST.size)
                self._skip = length - buf.skip(length)
                self._error(option, _REP.ERR_TOO_BIG, f"option length {length} exceeds {MAX_OPTION_LENGTH} bytes")
                continue
            if len(buf) < h.OPTION_REQUEST.size + length:
                return self._closed_or_need_data()
            buf.skip(h.OPTION_REQUEST.size)
            data = buf.take(length).tobytes()
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _handle_option(self, option: int, data: bytes) -> Event | type[PAUSED] | None:
        """Answer one option; returns an event for the application, PAUSED, or None to read the next option."""
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if not self._fixed:
            # spec: EXPORT_NAME is the only option of non-fixed newstyle; anything else ends the session.
            self._fail(f"option {option} sent by a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE")
        if option == Option.ABORT:
            # spec: the server MUST reply with NBD_REP_ACK, and SHOULD ignore any data.
            self._reply(option, _REP.ACK)
            self._phase = Phase.CLOSED
            return ClientAborted()
        if option == Option.STARTTLS:
            return self._starttls(data)
        if self.tls_mode is TlsMode.FORCEDTLS and not self._tls_active:
            self._error(option, _REP.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            return None
        if option == Option.LIST:
            self._list(data)
            return None
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(Option(option), data)
        if option == Option.STRUCTURED_REPLY:
            self._structured_reply(data)
            return None
        if option == Option.EXTENDED_HEADERS:
            self._extended_headers(data)
            return None
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._meta_context(Option(option), data)
        self._error(option, _REP.ERR_UNSUP, f"option {option} is not supported")
        return None

    def _starttls(self, data: bytes) -> Event | None:
        option = Option.STARTTLS
        if self.tls_mode is TlsMode.NOTLS:
            self._error(option, _REP.ERR_POLICY, "this server does not offer TLS")
        elif self._tls_active:
            self._error(option, _REP.ERR_INVALID, "TLS is already active")
        elif data:
            self._error(option, _REP.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        else:
            self._reply(option, _REP.ACK)
            if len(self._buf):
                self._fail("client sent more data after NBD_OPT_STARTTLS, before the TLS handshake")
            self._phase = Phase.TLS_UPGRADE
            return StartTLS()
        return None

    def _list(self, data: bytes) -> None:
        option = Option.LIST
        if data:
            self._error(option, _REP.ERR_INVALID, "NBD_OPT_LIST takes no data")
        elif self._offer is None:
            self._error(option, _REP.ERR_POLICY, "this server does not list its exports")
        else:
            for listing in self._offer:
                fields = {"name": listing.name, "description": listing.description}
                self._reply(option, _REP.SERVER, w.encode(w.ServerPayload, fields))
            self._reply(option, _REP.ACK)

    def _structured_reply(self, data: bytes) -> None:
        option = Option.STRUCTURED_REPLY
        if data:
            self._error(option, _REP.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif not self._allow_structured:
            self._error(option, _REP.ERR_UNSUP, "structured replies are turned off on this server")
        elif self.extended_headers:
            self._error(option, _REP.ERR_EXT_HEADER_REQD, "extended headers are already negotiated")
        else:
            self.structured_replies = True
            self._reply(option, _REP.ACK)

    def _extended_headers(self, data: bytes) -> None:
        option = Option.EXTENDED_HEADERS
        if data:
            self._error(option, _REP.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
        elif not self._allow_extended:
            self._error(option, _REP.ERR_UNSUP, "extended headers are turned off on this server")
        else:
            self.extended_headers = True
            self.structured_replies = True
            self._reply(option, _REP.ACK)

    def _ask_for_export(self, option: Option, name: str, fields: dict[str, object]) -> ExportRequested:
        self._pending = (option, fields)
        self._phase = Phase.AWAIT_EXPORT
        return ExportRequested(name, option)

    def _export_name(self, data: bytes) -> Event:
        if self.extended_headers:
            self._fail("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        if self.tls_mode is TlsMode.FORCEDTLS and not self._tls_active:
            # spec: EXPORT_NAME cannot be answered with an error, so the session ends.
            self._fail("NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS")
        name = w.decode(w.ExportNamePayload, data).name
        if len(data) > MAX_STRING_LENGTH:
            self._fail(f"export name of {len(data)} bytes exceeds {MAX_STRING_LENGTH}")
        return self._ask_for_export(Option.EXPORT_NAME, name, {})

    def _info_or_go(self, option: Option, data: bytes) -> Event | None:
        try:
            fields = w.decode(w.InfoRequestPayload, data)
        except RemoteProtocolError as exc:
            self._error(option, _REP.ERR_INVALID, str(exc))
            return None
        if len(fields.name.encode()) > MAX_STRING_LENGTH:
            self._error(option, _REP.ERR_TOO_BIG, f"export name exceeds {MAX_STRING_LENGTH} bytes")
            return None
        return self._ask_for_export(option, fields.name, {"requests": tuple(fields.requests)})

    def _meta_context(self, option: Option, data: bytes) -> Event | None:
        if option == Option.SET_META_CONTEXT:
            # spec: a SET replaces the previous selection, even when it fails.
            self._meta_export, self._meta_contexts = None, {}
            if not self.structured_replies:
                self._error(option, _REP.ERR_INVALID, "negotiate structured replies before meta contexts")
                return None
        try:
            fields = w.decode(w.MetaContextPayload, data)
        except RemoteProtocolError as exc:
            self._error(option, _REP.ERR_INVALID, str(exc))
            return None
        strings = [fields.name, *fields.queries]
        if any(len(s.encode()) > MAX_STRING_LENGTH for s in strings):
            self._error(option, _REP.ERR_TOO_BIG, f"a name or query exceeds {MAX_STRING_LENGTH} bytes")
            return None
        return self._ask_for_export(option, fields.name, {"queries": tuple(fields.queries)})

    def _answer_export(self, answer: Export | ExportUnknown) -> None:
        if self._phase is not Phase.AWAIT_EXPORT or self._pending is None:
            raise LocalProtocolError(f"{type(answer).__name__} sent with no ExportRequested to answer")
        option, fields = self._pending
        self._pending = None
        self._phase = Phase.OPTIONS
        if isinstance(answer, ExportUnknown):
            self._refuse_export(option, answer)
            return
        if answer.tls_required and not self._tls_active and self.tls_mode is not TlsMode.NOTLS:
            self._refuse_export(option, ExportUnknown("this export requires TLS", _REP.ERR_TLS_REQD))
        elif option == Option.EXPORT_NAME:
            self._enter_transmission(answer, with_export_name=True)
        elif option in (Option.INFO, Option.GO):
            self._answer_info(option, answer, fields["requests"])  # type: ignore[arg-type]
        else:
            self._answer_meta_context(option, answer, fields["queries"])  # type: ignore[arg-type]

    def _refuse_export(self, option: Option, answer: ExportUnknown) -> None:
        if option == Option.EXPORT_NAME:
            # spec: NBD_OPT_EXPORT_NAME has no error reply; the only refusal is to end the session.
            self._phase = Phase.CLOSED
            return
        reply_type = OptionReplyType(answer.reply_type)
        if not reply_type.is_error:
            raise LocalProtocolError(f"ExportUnknown.reply_type {reply_type.name} is not an error")
        if reply_type is _REP.ERR_TLS_REQD and (self._tls_active or self.tls_mode is TlsMode.NOTLS):
            raise LocalProtocolError("NBD_REP_ERR_TLS_REQD may only be sent before TLS by a TLS server")
        self._error(option, reply_type, answer.message or "unknown export")

    def _transmission_flags(self, export: Export) -> int:
        flags = int(export.flags) | TransmissionFlags.HAS_FLAGS
        if not self.structured_replies:
            flags &= ~int(TransmissionFlags.SEND_DF)
        else:
            flags |= TransmissionFlags.SEND_DF
        flags &= ~int(TransmissionFlags.BLOCK_STATUS_PAYLOAD)
        if self.extended_headers and self._meta_export == export.name and self._meta_contexts:
            flags |= TransmissionFlags.BLOCK_STATUS_PAYLOAD
        return flags

    def _answer_info(self, option: Option, export: Export, requests: tuple[int, ...]) -> None:
        wants_sizes = InfoType.BLOCK_SIZE in requests
        if not wants_sizes and (export.block_size_required or export.minimum_block_size > 1):
            # spec: send the constraints first, so the client can retry without a round trip.
            self._reply(option, _REP.INFO, r.block_size_payload(export))
            self._error(option, _REP.ERR_BLOCK_SIZE_REQD, "this export needs NBD_INFO_BLOCK_SIZE to be requested")
            return
        flags = self._transmission_flags(export)
        self._out.extend(r.info_replies(option, export, flags, requests))
        self._reply(option, _REP.ACK)
        if option == Option.GO:
            self._enter_transmission(export)

    def _answer_meta_context(self, option: Option, export: Export, queries: tuple[str, ...]) -> None:
        listing = option == Option.LIST_META_CONTEXT
        chosen = match_meta_contexts(queries, export.meta_contexts, listing=listing)
        if chosen is None:
            self._error(option, _REP.ERR_INVALID, "a meta context query must start with a namespace and a colon")
            return
        # Ids are only meaningful for SET (spec: LIST replies SHOULD carry id 0).
        numbered = [(0 if listing else i + 1, name) for i, name in enumerate(chosen)]
        for context_id, name in numbered:
            payload = w.encode(w.MetaContextReplyPayload, {"context_id": context_id, "name": name})
            self._reply(option, _REP.META_CONTEXT, payload)
        self._reply(option, _REP.ACK)
        if not listing:
            self._meta_export, self._meta_contexts = export.name, dict(numbered)

    def _enter_transmission(self, export: Export, with_export_name: bool = False) -> None:
        flags = self._transmission_flags(export)
        if with_export_name:
            fmt = w.ExportNameReplyNoZeroes if self._no_zeroes else w.ExportNameReply
            self._out.append(w.encode(fmt, {"size": export.size, "transmission_flags": flags}))
        if self._meta_export != export.name:
            self._meta_contexts = {}
        self.export = export
        self._size = export.size
        self._flags = flags
        self._min_block = export.minimum_block_size
        self._max_payload = export.maximum_payload
        self._request_codec = h.EXTENDED_REQUEST if self.extended_headers else h.REQUEST
        self._phase = Phase.TRANSMISSION
        self._events.append(
            HandshakeComplete(export, self.structured_replies, self.extended_headers, dict(self._meta_contexts))
        )

    # --- Transmission: requests ----------------------------------------------------------------------------

    def _next_request(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        codec = self._request_codec
        while True:
            if self._disconnecting:
                return ConnectionClosed() if not self._in_flight else PAUSED
            if self._skip:
                return self._closed_or_need_data()
            header = buf.header(codec)
            if header is None:
                return self._closed_or_need_data()
            magic, flags, command, cookie, offset, length = header
            if magic != codec.magic:
                self._fail(f"request magic {magic:#x} is not {codec.magic:#x} ({codec.name})")
            if self.extended_headers:
                payload = length if flags & _PAYLOAD_LEN else 0
            else:
                payload = length if command == _WRITE else 0
            if payload:
                if payload > self._max_payload:
                    if self.extended_headers:
                        # spec: SHOULD hard-disconnect on a payload above the maximum.
                        self._fail(f"request payload of {payload} bytes exceeds the maximum {self._max_payload}")
                    # The compact header's length is trustworthy: drop the payload unread and refuse.
                    buf.skip(codec.size)
                    self._skip = payload - buf.skip(payload)
                    self._reject(cookie, Errno.EINVAL, f"write of {payload} bytes exceeds the maximum payload")
                    continue
                if len(buf) < codec.size + payload:
                    return self._closed_or_need_data()
            if cookie in self._in_flight:
                self._fail(f"cookie {cookie:#x} reused while its request is in flight")
            buf.skip(codec.size)
            data = buf.take(payload) if payload else None
            context_ids = None
            if command == _BLOCK_STATUS and data is not None:
                parsed = self._block_status_filter(data)
                if isinstance(parsed, str):
                    self._reject(cookie, Errno.EINVAL, parsed, command, offset)
                    continue
                length, context_ids = parsed
            error = self._check_request(command, flags, offset, length)
            if error is None and command == _WRITE and data is None:
                error = Errno.EINVAL, "extended NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN"
            if error:
                self._reject(cookie, error[0], error[1], command, offset)
                continue
            return self._request_event(command, flags, cookie, offset, length, data, context_ids)

    def _check_request(self, command: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """The error a request must be refused with, or None if the application may see it."""
        allowed = _ALLOWED_FLAGS.get(command)  # type: ignore[call-overload]
        if allowed is None:
            return Errno.EINVAL, f"unknown command {command}"
        if flags & ~(allowed | _PAYLOAD_LEN):
            return Errno.EINVAL, f"flags {flags:#x} are not valid for command {Command(command).name}"
        if flags & _PAYLOAD_LEN and (not self.extended_headers or command not in (_WRITE, _BLOCK_STATUS)):
            return Errno.EINVAL, f"{Command(command).name} takes no payload here"
        tflags = self._flags
        if command in _WRITES and tflags & TransmissionFlags.READ_ONLY:
            return Errno.EPERM, "the export is read-only"
        needed = _NEEDS_FLAG.get(command)  # type: ignore[call-overload]
        if needed is not None and not tflags & needed:
            return Errno.EINVAL, f"{Command(command).name} was not advertised for this export"
        if flags & _FUA and not tflags & TransmissionFlags.SEND_FUA:
            return Errno.EINVAL, "FUA was not advertised for this export"
        if flags & _FAST_ZERO and not tflags & TransmissionFlags.SEND_FAST_ZERO:
            return Errno.EINVAL, "FAST_ZERO was not advertised for this export"
        if flags & _DF and not self.structured_replies:
            return Errno.EINVAL, "DF needs structured replies"
        if command == _BLOCK_STATUS and not self._meta_contexts:
            return Errno.EINVAL, "no meta context was negotiated for block status"
        if command in _RANGED:
            if length == 0:
                return Errno.EINVAL, f"{Command(command).name} of length 0"
            if offset + length > self._size:
                error = Errno.ENOSPC if command in (_WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
                return error, f"offset {offset} + length {length} is past the export size {self._size}"
            if (offset | length) % self._min_block and command != _BLOCK_STATUS:
                return Errno.EINVAL, f"offset {offset} / length {length} not aligned to {self._min_block} bytes"
            if command == _READ and length > self._max_payload:
                error = Errno.EOVERFLOW if self.structured_replies else Errno.EINVAL
                return error, f"read of {length} bytes exceeds the maximum payload {self._max_payload}"
        return None

    def _reject(self, cookie: int, error: Errno, message: str, command: int = -1, offset: int = 0) -> None:
        # Engine-made error replies: a structured one where negotiated (it carries the message).
        if self.structured_replies:
            self._out.append(r.error_chunk(self.extended_headers, True, cookie, offset, error, message, None))
        else:
            self._out.append(r.simple_reply(error, cookie))

    def _request_event(
        self,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        data: memoryview | None,
        context_ids: tuple[int, ...] | None,
    ) -> Event:
        if command == _READ:
            self._in_flight[cookie] = _InFlight(command, offset, length, flags)
            return ReadRequest(cookie, offset, length, CommandFlags(flags))
        if command == _WRITE:
            assert data is not None  # _next_request refused a write without one
            self._in_flight[cookie] = _InFlight(command, offset, len(data), flags)
            return WriteRequest(cookie, offset, data, CommandFlags(flags & ~_PAYLOAD_LEN))
        if command == _DISC:
            self._disconnecting = True
            return DisconnectRequest(cookie)
        record = _InFlight(command, offset, length, flags)
        self._in_flight[cookie] = record
        flags = CommandFlags(flags & ~_PAYLOAD_LEN)
        if command == Command.FLUSH:
            return FlushRequest(cookie, flags)
        if command == Command.TRIM:
            return TrimRequest(cookie, offset, length, flags)
        if command == Command.CACHE:
            return CacheRequest(cookie, offset, length, flags)
        if command == Command.WRITE_ZEROES:
            return WriteZeroesRequest(cookie, offset, length, flags)
        if command == Command.RESIZE:
            return ResizeRequest(cookie, offset, flags)
        ids = context_ids if context_ids is not None else tuple(self._meta_contexts)
        record.context_ids = ids
        return BlockStatusRequest(cookie, offset, length, flags, ids)

    def _block_status_filter(self, data: memoryview) -> tuple[int, tuple[int, ...]] | str:
        # The payload form of an extended NBD_CMD_BLOCK_STATUS: effect length, then the wanted context ids.
        if not self._flags & TransmissionFlags.BLOCK_STATUS_PAYLOAD:
            return "block status payloads were not advertised"
        if len(data) < 8 or len(data) % 4:
            return f"block status payload of {len(data)} bytes is not 8 + 4n"
        fields = w.decode(w.BlockStatusRequestPayload, data)
        ids = tuple(fields.context_ids)
        if not ids or len(set(ids)) != len(ids) or any(i not in self._meta_contexts for i in ids):
            return f"block status context ids {list(ids)} are empty, repeated or not negotiated"
        return fields.effect_length, ids

    # --- Transmission: replies -----------------------------------------------------------------------------

    def _record(self, cookie: int) -> _InFlight:
        record = self._in_flight.get(cookie)
        if record is None:
            raise LocalProtocolError(f"no request with cookie {cookie:#x} is waiting for a reply")
        return record

    def _send_reply(self, event: ReadData | ReadHole | SuccessReply | ErrorReply | BlockStatusReply) -> None:
        if self._phase is not Phase.TRANSMISSION:
            raise LocalProtocolError(f"cannot send {type(event).__name__} in phase {self._phase.value}")
        if type(event) is ReadData:
            self._read_chunk(event.cookie, event.offset, len(event.data), event.data, event.done)
        elif type(event) is ReadHole:
            self._read_chunk(event.cookie, event.offset, event.length, None, event.done)
        elif type(event) is SuccessReply:
            self._success(event.cookie)
        elif type(event) is ErrorReply:
            self._error_reply(event)
        else:
            assert isinstance(event, BlockStatusReply)
            self._block_status(event)

    def _read_chunk(
        self, cookie: int, offset: int, size: int, data: bytes | bytearray | memoryview | None, done: bool
    ) -> None:
        record = self._record(cookie)
        if record.command != _READ:
            raise LocalProtocolError(f"read data sent for cookie {cookie:#x}, a {Command(record.command).name}")
        start = record.offset
        if size <= 0 or offset < start or offset + size > start + record.length:
            raise LocalProtocolError(
                f"read chunk {offset}+{size} is empty or outside request {start}+{record.length} (cookie {cookie:#x})"
            )
        covered = record.covered + size
        complete = covered == record.length
        if done and not complete:
            raise LocalProtocolError(f"read {cookie:#x} marked done with {covered} of {record.length} bytes sent")
        out = self._out
        if not self.structured_replies:
            # A simple reply is one header then the data, in order: chunks must be consecutive.
            if offset != start + record.covered:
                raise LocalProtocolError(f"simple read reply chunk at {offset}, expected {start + record.covered}")
            if not record.started:
                out.append(r.simple_reply(0, cookie))
            if data is None:
                out.extend(r.zero_pieces(size))
            else:
                out.append(data)
        else:
            if record.flags & _DF and not (offset == start and complete):
                raise LocalProtocolError(f"read {cookie:#x} has DF set: send it in one chunk")
            self._check_overlap(record, offset, size)
            last = done or complete
            if data is None:
                out.append(r.offset_hole_chunk(self.extended_headers, last, cookie, start, offset, size))
            else:
                out.append(r.offset_data_header(self.extended_headers, last, cookie, start, offset, size))
                out.append(data)
        record.started = True
        record.covered = covered
        if complete:
            del self._in_flight[cookie]

    @staticmethod
    def _check_overlap(record: _InFlight, offset: int, size: int) -> None:
        if not record.started:
            record.ranges = [(offset, size)]
            return
        assert record.ranges is not None
        end = offset + size
        for other, other_size in record.ranges:
            if offset < other + other_size and other < end:
                raise LocalProtocolError(f"read chunk {offset}+{size} overlaps chunk {other}+{other_size}")
        record.ranges.append((offset, size))

    def _success(self, cookie: int) -> None:
        record = self._record(cookie)
        if record.command in (_READ, _BLOCK_STATUS):
            raise LocalProtocolError(
                f"SuccessReply cannot answer {Command(record.command).name} {cookie:#x}: send its data"
            )
        del self._in_flight[cookie]
        if self.extended_headers:
            self._out.append(r.chunk_header(True, 1, 0, cookie, record.offset, 0))
        else:
            self._out.append(r.simple_reply(0, cookie))

    def _error_reply(self, event: ErrorReply) -> None:
        record = self._record(event.cookie)
        error = Errno(event.error)
        if error == Errno.OK:
            raise LocalProtocolError("ErrorReply needs a non-zero error")
        if not self.structured_replies:
            if record.started:
                raise LocalProtocolError(
                    f"read {event.cookie:#x} already sent data in a simple reply; an error can only be a disconnect"
                )
            self._out.append(r.simple_reply(error, event.cookie))
        else:
            offset = event.offset
            if offset is not None and not record.offset <= offset < record.offset + max(record.length, 1):
                span = f"{record.offset}+{record.length}"
                raise LocalProtocolError(f"error offset {offset} is outside the request {span}")
            if len(event.message.encode()) > MAX_STRING_LENGTH:
                raise LocalProtocolError(f"error message exceeds {MAX_STRING_LENGTH} bytes")
            chunk = r.error_chunk(
                self.extended_headers, True, event.cookie, record.offset, error, event.message, offset
            )
            self._out.append(chunk)
        del self._in_flight[event.cookie]

    def _block_status(self, event: BlockStatusReply) -> None:
        record = self._record(event.cookie)
        if record.command != _BLOCK_STATUS:
            raise LocalProtocolError(f"block status sent for cookie {event.cookie:#x}, not a block status request")
        if set(event.extents) != set(record.context_ids):
            raise LocalProtocolError(
                f"block status reply covers contexts {sorted(event.extents)}, the request asked for "
                f"{sorted(record.context_ids)}"
            )
        chunks = []
        for context_id in record.context_ids:
            extents = self._normalise_extents(record, event.extents[context_id])
            chunks.append((context_id, extents))
        for i, (context_id, extents) in enumerate(chunks):
            last = i == len(chunks) - 1
            self._out.append(
                r.block_status_chunk(self.extended_headers, last, event.cookie, record.offset, context_id, extents)
            )
        del self._in_flight[event.cookie]

    def _normalise_extents(self, record: _InFlight, extents: Iterable[Extent]) -> list[Extent]:
        """Make the application's extents what the spec allows: non-empty lengths that fit the header format,
        at most one with REQ_ONE (no longer than the request), none starting past the request's end, at most
        2^20 of them, and at least one."""
        limit = 0xFFFFFFFF if not self.extended_headers else 0xFFFFFFFFFFFFFFFF
        limit -= limit % self._min_block
        status_limit = 0xFFFFFFFF if not self.extended_headers else 0xFFFFFFFFFFFFFFFF
        out: list[Extent] = []
        covered = 0
        for length, status in extents:
            if length <= 0:
                raise LocalProtocolError(f"extent length {length} must be positive")
            if not 0 <= status <= status_limit:
                raise LocalProtocolError(f"extent status {status:#x} does not fit the descriptor")
            while length > 0 and covered < record.length:
                step = min(length, limit)
                out.append(Extent(step, status))
                covered += step
                length -= step
            if covered >= record.length or len(out) >= _MAX_DESCRIPTORS:
                break
        if not out:
            raise LocalProtocolError("a block status reply needs at least one extent per context")
        if record.flags & _REQ_ONE:
            first = out[0]
            out = [Extent(min(first.length, record.length), first.status)]
        return out[:_MAX_DESCRIPTORS]
