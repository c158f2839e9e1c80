"""ClientConnection: the client role of NBD, from the server's greeting to the last reply, without I/O.

The driver feeds the server's bytes to ``receive_data``, takes events from ``next_event``, sends options and
requests with ``send``, and writes out ``data_to_send()``. Options go one at a time, and each ends in exactly
one event: ``ExportList`` (LIST), ``ExportInfo`` (INFO), ``HandshakeComplete`` (GO, EXPORT_NAME),
``MetaContexts`` (LIST/SET_META_CONTEXT), ``OptionAck`` (STRUCTURED_REPLY, EXTENDED_HEADERS, OptionRaw),
``StartTLS`` (STARTTLS), ``ClientAborted`` (ABORT), or ``OptionError`` for any refusal. In transmission every
request ends in one event: ``ReadReply``, ``BlockStatusReply``, ``SuccessReply`` or ``ErrorReply``.

The handshake half lives here; the transmission half in ``_client_requests`` (requests out) and ``_client_replies``
(replies in), what both roles share in
``_connection``, and when each message is allowed in the transition tables of ``_state``.
"""

from __future__ import annotations

import struct

from nbdproto.wire import (
    MAX_OPTION_LENGTH,
    MAX_STRING_LENGTH,
    ClientFlags,
    HandshakeFlags,
    InfoType,
    LocalProtocolError,
    Magic,
    Option,
    OptionReplyType,
    TransmissionFlags,
    headers,
    layout,
)

from ._client_checks import check_block_sizes, check_context_name, check_export_size
from ._client_replies import ClientReplies
from ._events import ConnectionClosed, Event
from ._handshake_events import (
    ClientAborted,
    Export,
    ExportInfo,
    ExportList,
    ExportListing,
    HandshakeComplete,
    MetaContexts,
    OptionAbort,
    OptionAck,
    OptionError,
    OptionExportName,
    OptionExtendedHeaders,
    OptionGo,
    OptionInfo,
    OptionList,
    OptionListMetaContext,
    OptionRaw,
    OptionSetMetaContext,
    OptionStartTLS,
    OptionStructuredReply,
    ServerGreeting,
    StartTLS,
)
from ._state import NEED_DATA, PAUSED, SENDS, Phase, Role, Trigger
from ._transmission_events import ReadRequest, WriteRequest

__all__ = ["ClientConnection"]

_REP = OptionReplyType
_SENDABLE = SENDS[Role.CLIENT]
_TRANSMISSION = Phase.TRANSMISSION
_GREETING = 16  # NBDMAGIC and the word that says newstyle or oldstyle
_ANSWER_LIMIT = 32 * 1024 * 1024
"""The most reply payload one option's answer may gather (exports listed, contexts, information): the spec's
2^25 bytes that need not be taken for denial of service; a server that sends more is refused, not buffered."""


class ClientConnection(ClientReplies):
    """The client side of one NBD connection.

    ``no_zeroes``: accept the server's offer to drop the 124 zero bytes after NBD_OPT_EXPORT_NAME's reply.
    ``fixed_newstyle``: accept the server's fixed newstyle (answer its flag); without it only
    NBD_OPT_EXPORT_NAME may be sent, as to a server that lacks it (a client emulating an old one does this).
    ``strict``: hold requests to everything the server stated (the ``strict`` attribute).
    ``send`` raises LocalProtocolError when our side breaks a rule: during the handshake that ends the
    connection (phase ERROR); a request refused in transmission is simply not sent. RemoteProtocolError, when
    the server breaks a rule, always ends it.
    """

    def __init__(self, *, no_zeroes: bool = True, strict: bool = False, fixed_newstyle: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self._want_no_zeroes = no_zeroes
        self._want_fixed = fixed_newstyle
        self._greeting_word: int | None = None
        # The option waiting for its answer, and what its answer has gathered so far.
        self._option: object | None = None
        self._gathered: list[object] = []
        self._gathered_bytes = 0
        self._answered: set[object] = set()  # ids and names SET_META_CONTEXT has answered so far

    # --- The driver's interface --------------------------------------------------------------------------

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        if self._into is not None:
            data = self._fill_into(data)  # the rest of a read's data, into the caller's buffer
            if not data:
                return
        self._buf.append(data)

    def send(self, event: Event) -> None:
        """Send an option (handshake) or a request (transmission), as the phase allows (``_state.SENDS``)."""
        phase = self._phase
        if phase is _TRANSMISSION and (type(event) is ReadRequest or type(event) is WriteRequest):
            self._send_request(event)  # the commonest requests, first (and without hashing the phase)
            return
        if phase is Phase.ERROR:
            raise LocalProtocolError("the connection already failed")
        allowed = type(event) in _SENDABLE.get(phase, ())
        if phase is Phase.TRANSMISSION:
            if not allowed:
                # spec: no option may follow the handshake's successful end.
                raise LocalProtocolError(f"{type(event).__name__} cannot be sent in transmission: it is not a request")
            # Every check runs before anything is queued or remembered: a refused request leaves the
            # connection as it was, so the caller may go on with valid ones.
            self._send_request(event)
            return
        try:
            if not allowed:
                raise LocalProtocolError(f"cannot send {type(event).__name__} in phase {phase.value}")
            self._send_option(event)
        except LocalProtocolError:
            self._break()
            raise

    # --- Greeting -----------------------------------------------------------------------------------------

    def _need_data(self, during: str) -> type[NEED_DATA]:
        if self._eof:
            self._fail(f"the server closed the connection {during}")
        return NEED_DATA

    def _next_in_greeting(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        if self._greeting_word is None:
            if len(buf) < _GREETING:
                return self._need_data("before its greeting")
            magic, word = struct.unpack(">QQ", buf.take(_GREETING))
            if magic != Magic.NBDMAGIC:
                self._fail(f"greeting magic {magic:#x} is not NBDMAGIC")
            if word not in (Magic.CLISERV_MAGIC, Magic.IHAVEOPT):
                self._fail(f"greeting word {word:#x} is neither IHAVEOPT nor the oldstyle magic")
            self._greeting_word = word
        if self._greeting_word == Magic.CLISERV_MAGIC:
            return self._oldstyle()
        if len(buf) < 2:
            return self._need_data("in its greeting")
        flags = struct.unpack(">H", buf.take(2))[0]
        self._fixed = self._want_fixed and bool(flags & HandshakeFlags.FIXED_NEWSTYLE)
        self._no_zeroes = self._want_no_zeroes and bool(flags & HandshakeFlags.NO_ZEROES)
        client_flags = (ClientFlags.FIXED_NEWSTYLE if self._fixed else 0) | (
            ClientFlags.NO_ZEROES if self._no_zeroes else 0
        )
        self._out.append(layout.encode(layout.ClientFlagsMessage, {"client_flags": client_flags}))
        self._move(Trigger.GREETED)
        return ServerGreeting(flags)

    def _oldstyle(self) -> Event | type[NEED_DATA]:
        # Size, 32 bits of flags (the low 16 are the transmission flags), 124 zero bytes; then transmission.
        if len(self._buf) < 136:
            return self._need_data("in its greeting")
        size, flags = struct.unpack(">QI", self._buf.take(12))
        if bytes(self._buf.take(124)) != bytes(124):
            self._fail("the oldstyle greeting's 124 reserved bytes are not zero")
        self._enter_transmission(Export("", size, TransmissionFlags(flags & 0xFFFF)), trigger=Trigger.OLDSTYLE_GREETING)
        return ServerGreeting(0, oldstyle=True)

    # --- Options ------------------------------------------------------------------------------------------

    def _send_option(self, event: object) -> None:
        if self._option is not None:
            raise LocalProtocolError(f"{type(self._option).__name__} is still waiting for its answer")
        code, payload = self._option_bytes(event)
        if not self._fixed and code != Option.EXPORT_NAME:
            raise LocalProtocolError("a server without FIXED_NEWSTYLE understands only NBD_OPT_EXPORT_NAME")
        self._out.append(headers.OPTION_REQUEST.pack(headers.OPTION_REQUEST.magic, code, len(payload)) + payload)
        self._option = event
        self._gathered = []
        self._gathered_bytes = 0
        self._answered = set()
        if code == Option.EXPORT_NAME and self.extended_headers:
            raise LocalProtocolError("NBD_OPT_EXPORT_NAME must not follow extended headers: use OptionGo")

    def _option_bytes(self, event: object) -> tuple[int, bytes]:
        if isinstance(event, OptionRaw):
            return event.option, event.data
        if isinstance(event, OptionExportName):
            _check_string(event.name)
            return Option.EXPORT_NAME, layout.encode(layout.ExportNamePayload, {"name": event.name})
        if isinstance(event, (OptionInfo, OptionGo)):
            _check_string(event.name)
            if len(set(event.requests)) != len(event.requests):
                raise LocalProtocolError(f"information requests {list(event.requests)} name one type twice")
            payload = layout.encode(layout.InfoRequestPayload, {"name": event.name, "requests": list(event.requests)})
            return (Option.INFO if isinstance(event, OptionInfo) else Option.GO), payload
        if isinstance(event, (OptionListMetaContext, OptionSetMetaContext)):
            for text in (event.name, *event.queries):
                _check_string(text)
            for query in event.queries:
                if query.find(":") < 1:
                    raise LocalProtocolError(f"meta context query {query!r} does not start with a namespace and ':'")
            if isinstance(event, OptionSetMetaContext) and not self.structured_replies:
                raise LocalProtocolError("NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers")
            payload = layout.encode(layout.MetaContextPayload, {"name": event.name, "queries": list(event.queries)})
            code = Option.LIST_META_CONTEXT if isinstance(event, OptionListMetaContext) else Option.SET_META_CONTEXT
            return code, payload
        if isinstance(event, OptionStartTLS):
            if self._tls_active:
                raise LocalProtocolError("TLS is already active: NBD_OPT_STARTTLS must not be sent again")
            return Option.STARTTLS, b""
        simple: dict[type, Option] = {
            OptionAbort: Option.ABORT,
            OptionList: Option.LIST,
            OptionStructuredReply: Option.STRUCTURED_REPLY,
            OptionExtendedHeaders: Option.EXTENDED_HEADERS,
        }
        return simple[type(event)], b""

    def _next_in_options(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        while True:
            option = self._option
            if option is None:
                if self._eof:
                    self._move(Trigger.PEER_CLOSED)
                    return ConnectionClosed()
                if len(buf):
                    self._fail(f"the server sent {len(buf)} bytes nobody asked for during option haggling")
                return PAUSED
            if isinstance(option, OptionExportName):
                return self._export_name_reply(option)
            header = buf.header(headers.OPTION_REPLY)
            if header is None:
                if self._eof and isinstance(option, OptionAbort):
                    # spec: a client should handle a server that closes instead of acknowledging ABORT.
                    self._option = None
                    self._move(Trigger.ABORTED)
                    return ClientAborted()
                return self._need_data(f"while {type(option).__name__} waited for its answer")
            magic, code, reply_type, length = header
            if magic != headers.OPTION_REPLY.magic:
                self._fail(f"option reply magic {magic:#x} is not the option reply magic")
            expected = self._option_bytes_code(option)
            if code != expected:
                self._fail(f"option reply for option {code}, but option {expected} was asked")
            if length > MAX_OPTION_LENGTH:
                self._fail(f"option reply length {length} exceeds the {MAX_OPTION_LENGTH}-byte limit")
            if len(buf) < headers.OPTION_REPLY.size + length:
                return self._need_data("in the middle of an option reply")
            buf.skip(headers.OPTION_REPLY.size)
            payload = buf.take(length).tobytes()
            event = self._option_reply(option, reply_type, payload)
            if event is not None:
                return event

    @staticmethod
    def _option_bytes_code(option: object) -> int:
        if isinstance(option, OptionRaw):
            return option.option
        return {
            OptionAbort: Option.ABORT,
            OptionList: Option.LIST,
            OptionStartTLS: Option.STARTTLS,
            OptionInfo: Option.INFO,
            OptionGo: Option.GO,
            OptionStructuredReply: Option.STRUCTURED_REPLY,
            OptionListMetaContext: Option.LIST_META_CONTEXT,
            OptionSetMetaContext: Option.SET_META_CONTEXT,
            OptionExtendedHeaders: Option.EXTENDED_HEADERS,
        }[type(option)]

    def _finish_option(self) -> None:
        self._option = None
        self._gathered = []
        self._gathered_bytes = 0
        self._answered = set()

    def _option_reply(self, option: object, reply_type: int, payload: bytes) -> Event | None:
        """Handle one option reply; the event that ends the option, or None while it goes on."""
        if reply_type & (1 << 31):
            message = layout.decode(layout.ErrorReplyPayload, payload).message if payload else ""
            self._finish_option()
            if isinstance(option, OptionSetMetaContext):
                self._meta_export, self._meta_contexts = None, {}
            return OptionError(self._option_bytes_code(option), reply_type, message)
        if reply_type == _REP.ACK:
            if payload:
                self._fail(f"NBD_REP_ACK with {len(payload)} bytes of payload")
            return self._option_done(option)
        self._gathered_bytes += len(payload) + headers.OPTION_REPLY.size
        if self._gathered_bytes > _ANSWER_LIMIT:
            self._fail(f"the answer to {type(option).__name__} exceeds {_ANSWER_LIMIT >> 20} MiB of replies")
        if reply_type == _REP.SERVER and isinstance(option, OptionList):
            fields = layout.decode(layout.ServerPayload, payload)
            self._gathered.append(ExportListing(fields.name, fields.description))
            return None
        if reply_type == _REP.INFO and isinstance(option, (OptionInfo, OptionGo)):
            if len(payload) < 2:
                self._fail(f"NBD_REP_INFO of {len(payload)} bytes has no information type")
            self._gathered.append(payload)
            return None
        if reply_type == _REP.META_CONTEXT and isinstance(option, (OptionListMetaContext, OptionSetMetaContext)):
            fields = layout.decode(layout.MetaContextReplyPayload, payload)
            listing = isinstance(option, OptionListMetaContext)
            check_context_name(fields.name, tuple(option.queries), listing)
            if not listing:
                if fields.context_id in self._answered or fields.name in self._answered:
                    self._fail(f"NBD_OPT_SET_META_CONTEXT answered id {fields.context_id} / context "
                               f"{fields.name!r} twice")  # fmt: skip
                self._answered.update((fields.context_id, fields.name))
            self._gathered.append((fields.context_id, fields.name))
            return None
        self._fail(f"reply type {reply_type} is not a valid answer to {type(option).__name__}")

    def _option_done(self, option: object) -> Event:
        gathered = self._gathered
        self._finish_option()
        if isinstance(option, OptionList):
            return ExportList(tuple(gathered))  # type: ignore[arg-type]
        if isinstance(option, (OptionInfo, OptionGo)):
            export = self._export_from_info(option.name, gathered)  # type: ignore[arg-type]
            if isinstance(option, OptionInfo):
                return ExportInfo(export)
            if self._meta_export != option.name:
                self._meta_contexts = {}
            self._enter_transmission(export, bound=InfoType.BLOCK_SIZE in option.requests)
            return self._events.popleft()
        if isinstance(option, (OptionListMetaContext, OptionSetMetaContext)):
            pairs: list[tuple[int, str]] = gathered  # type: ignore[assignment]
            contexts = dict(pairs)
            if isinstance(option, OptionListMetaContext):
                # spec: the id of a listed context is reserved (zero) and MUST be disregarded; number them.
                contexts = dict(enumerate(name for _, name in pairs))
            if isinstance(option, OptionSetMetaContext):
                self._meta_export, self._meta_contexts = option.name, contexts
                code = Option.SET_META_CONTEXT
            else:
                code = Option.LIST_META_CONTEXT
            return MetaContexts(code, contexts)
        if isinstance(option, OptionStartTLS):
            if len(self._buf):
                self._fail("the server sent plaintext after acknowledging NBD_OPT_STARTTLS")
            self._move(Trigger.STARTTLS_ACCEPTED)
            return StartTLS()
        if isinstance(option, OptionAbort):
            self._move(Trigger.ABORTED)
            return ClientAborted()
        if isinstance(option, OptionStructuredReply):
            self.structured_replies = True
        elif isinstance(option, OptionExtendedHeaders):
            self.extended_headers = self.structured_replies = True
        return OptionAck(self._option_bytes_code(option))

    def _export_from_info(self, name: str, infos: list[bytes]) -> Export:
        size: int | None = None
        flags = 0
        canonical, description = name, ""
        sizes: tuple[int, int, int] | None = None
        for payload in infos:
            info_type = struct.unpack(">H", payload[:2])[0]
            if info_type == InfoType.EXPORT:
                fields = layout.decode(layout.InfoExportPayload, payload)
                size, flags = fields.size, fields.transmission_flags
            elif info_type == InfoType.NAME:
                canonical = layout.decode(layout.InfoNamePayload, payload).name
            elif info_type == InfoType.DESCRIPTION:
                description = layout.decode(layout.InfoDescriptionPayload, payload).description
            elif info_type == InfoType.BLOCK_SIZE:
                fields = layout.decode(layout.InfoBlockSizePayload, payload)
                sizes = (fields.minimum, fields.preferred, fields.maximum)
            # spec: a client MUST ignore information replies it does not understand.
        if size is None:
            self._fail("the server acknowledged INFO/GO without sending NBD_INFO_EXPORT")
        check_export_size(size)
        if sizes is None:
            return Export(canonical, size, TransmissionFlags(flags), description, block_sizes_known=False)
        minimum, preferred, maximum = sizes
        check_block_sizes(minimum, preferred, maximum)
        return Export(canonical, size, TransmissionFlags(flags), description, minimum, preferred, maximum)

    def _export_name_reply(self, option: OptionExportName) -> Event | type[NEED_DATA]:
        fmt = layout.ExportNameReplyNoZeroes if self._no_zeroes else layout.ExportNameReply
        size = fmt.sizeof()
        if len(self._buf) < size:
            if self._eof:
                self._fail(f"the server closed the connection: it refused export {option.name!r}")
            return NEED_DATA
        fields = layout.decode(fmt, self._buf.take(size))
        self._finish_option()
        self._meta_contexts = {}
        self._enter_transmission(Export(option.name, fields.size, TransmissionFlags(fields.transmission_flags)))
        return self._events.popleft()

    def _enter_transmission(self, export: Export, bound: bool = True, trigger: Trigger = Trigger.EXPORT_CHOSEN) -> None:
        if not export.flags & TransmissionFlags.HAS_FLAGS:
            self._fail(f"transmission flags {int(export.flags):#x} lack NBD_FLAG_HAS_FLAGS")
        check_export_size(export.size)
        self._start_transmission(export, bound)
        self._move(trigger)
        self._events.append(
            HandshakeComplete(export, self.structured_replies, self.extended_headers, dict(self._meta_contexts))
        )


def _check_string(text: str) -> None:
    # spec ("Conventions"): UTF-8, no NUL, at most 4096 bytes.
    if len(text.encode()) > MAX_STRING_LENGTH:
        raise LocalProtocolError(f"string of {len(text.encode())} bytes exceeds the {MAX_STRING_LENGTH}-byte limit")
    if "\0" in text:
        raise LocalProtocolError(f"string {text[:64]!r} holds a NUL character")
