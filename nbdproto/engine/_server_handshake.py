"""The server's half of the handshake: client flags, then fixed newstyle option haggling.

The engine answers every option itself. It needs the application only to look exports up, which it asks for
with ``ExportRequested`` and then waits (phase AWAIT_EXPORT) for ``Export`` or ``ExportUnknown``. The rules
that decide each answer are the spec's, cited where they are not obvious: TLS modes (spec: "TLS support"),
INFO/GO (spec: "NBD_OPT_INFO and NBD_OPT_GO"), meta contexts (``_metacontexts``), block sizes.
"""

from __future__ import annotations

from nbdproto.wire import (
    DEFAULT_MAX_PAYLOAD,
    MAX_OPTION_LENGTH,
    MAX_STRING_LENGTH,
    ClientFlags,
    Command,
    InfoType,
    LocalProtocolError,
    Option,
    OptionReplyType,
    RemoteProtocolError,
    TransmissionFlags,
    headers,
    layout,
)

from . import _replies
from ._commands import COMMANDS, allowed_flags, usable
from ._events import Event
from ._handshake_events import ClientAborted, Export, ExportRequested, ExportUnknown, HandshakeComplete, StartTLS
from ._metacontexts import match_meta_contexts
from ._server_base import ServerBase
from ._state import NEED_DATA, PAUSED, TlsMode, Trigger

__all__ = ["ServerHandshake"]

_REP = OptionReplyType
_KNOWN_CLIENT_FLAGS = int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES)  # an int: ~IntFlag drops unknown bits
# The largest data an OFFSET_DATA chunk can carry in a structured (20-byte header) reply: its 32-bit length
# counts the 8-byte offset too (spec: "NBD_CMD_READ", a longer read MUST be split).
_MAX_STRUCTURED_DATA = 0xFFFFFFFF - 8


def _check_block_sizes(export: Export) -> None:
    """The constraints an export advertises must be ones the spec allows ("Size constraints")."""
    minimum, preferred, maximum = export.minimum_block_size, export.preferred_block_size, export.maximum_payload
    if not (0 < minimum <= 65536 and not minimum & (minimum - 1)):
        raise LocalProtocolError(f"minimum block size {minimum} must be a power of two from 1 to 65536")
    if not (max(minimum, 512) <= preferred and not preferred & (preferred - 1)):
        raise LocalProtocolError(f"preferred block size {preferred} must be a power of two >= 512 and >= {minimum}")
    if not preferred <= maximum <= 0xFFFFFFFF:
        raise LocalProtocolError(f"maximum payload {maximum} must be from {preferred} to 0xffffffff")


class ServerHandshake(ServerBase):
    """Option haggling for ServerConnection."""

    def _next_in_greeting(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        if len(self._buf) < 4:
            return self._closed_or_need_data()
        flags = layout.decode(layout.ClientFlagsMessage, self._buf.take(4)).client_flags
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # spec: a server that receives client flags it does not know MUST close the connection.
            self._fail(f"client flags {flags:#x} include unknown bits {flags & ~_KNOWN_CLIENT_FLAGS:#x}")
        self._fixed = bool(flags & ClientFlags.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlags.NO_ZEROES)
        self._move(Trigger.GREETED)
        return self._next_in_options()

    def _reply(self, option: int, reply_type: int, payload: bytes = b"") -> None:
        self._out.append(_replies.option_reply(option, reply_type, payload))

    def _error(self, option: int, reply_type: OptionReplyType, message: str) -> None:
        self._out.append(_replies.option_error(option, reply_type, message))

    def _next_in_options(self) -> Event | type[NEED_DATA] | type[PAUSED]:
        buf = self._buf
        while True:
            if self._skip:
                return self._closed_or_need_data()
            header = buf.header(headers.OPTION_REQUEST)
            if header is None:
                return self._closed_or_need_data()
            magic, option, length = header
            if magic != headers.OPTION_REQUEST.magic:
                self._fail(f"option request magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_LENGTH:
                if option == Option.EXPORT_NAME or not self._fixed:
                    self._fail(f"option {option} length {length} exceeds the {MAX_OPTION_LENGTH}-byte option limit")
                buf.skip(headers.OPTION_REQUEST.size)
                self._skip = length - buf.skip(length)
                self._error(option, _REP.ERR_TOO_BIG, f"option length {length} exceeds {MAX_OPTION_LENGTH} bytes")
                continue
            if len(buf) < headers.OPTION_REQUEST.size + length:
                return self._closed_or_need_data()
            buf.skip(headers.OPTION_REQUEST.size)
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
            self._move(Trigger.ABORTED)
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
            self._move(Trigger.STARTTLS_ACCEPTED)
            return StartTLS()
        return None

    def _list(self, data: bytes) -> None:
        option = Option.LIST
        if data:
            self._error(option, _REP.ERR_INVALID, "NBD_OPT_LIST takes no data")
        elif self._offer is None:
            self._error(option, _REP.ERR_POLICY, "this server does not list its exports")
        else:
            try:
                replies = [_replies.server_reply(option, listing) for listing in self._offer]
            except LocalProtocolError:
                self._break()  # the application's offer list holds a name no client could use
                raise
            self._out.extend(replies)
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
        self._move(Trigger.EXPORT_REQUESTED)
        return ExportRequested(name, option)

    def _export_name(self, data: bytes) -> Event:
        if self.extended_headers:
            self._fail("NBD_OPT_EXPORT_NAME after extended headers were negotiated")
        if self.tls_mode is TlsMode.FORCEDTLS and not self._tls_active:
            # spec: EXPORT_NAME cannot be answered with an error, so the session ends.
            self._fail("NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS")
        name = layout.decode(layout.ExportNamePayload, data).name
        if len(data) > MAX_STRING_LENGTH or "\0" in name:
            # spec ("Conventions"): a string holds no NUL and is at most 4096 bytes; EXPORT_NAME cannot be refused.
            self._fail(f"export name of {len(data)} bytes is over {MAX_STRING_LENGTH} bytes or holds a NUL")
        return self._ask_for_export(Option.EXPORT_NAME, name, {})

    def _info_or_go(self, option: Option, data: bytes) -> Event | None:
        try:
            fields = layout.decode(layout.InfoRequestPayload, data)
        except RemoteProtocolError as exc:
            self._error(option, _REP.ERR_INVALID, str(exc))
            return None
        if len(fields.name.encode()) > MAX_STRING_LENGTH:
            self._error(option, _REP.ERR_TOO_BIG, f"export name exceeds {MAX_STRING_LENGTH} bytes")
            return None
        if "\0" in fields.name:
            self._error(option, _REP.ERR_INVALID, "an export name must not hold a NUL character")
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
            fields = layout.decode(layout.MetaContextPayload, data)
        except RemoteProtocolError as exc:
            self._error(option, _REP.ERR_INVALID, str(exc))
            return None
        strings = [fields.name, *fields.queries]
        if any(len(s.encode()) > MAX_STRING_LENGTH for s in strings):
            self._error(option, _REP.ERR_TOO_BIG, f"a name or query exceeds {MAX_STRING_LENGTH} bytes")
            return None
        if any("\0" in s for s in strings):
            self._error(option, _REP.ERR_INVALID, "a name or query must not hold a NUL character")
            return None
        return self._ask_for_export(option, fields.name, {"queries": tuple(fields.queries)})

    def _answer_export(self, answer: Export | ExportUnknown) -> None:
        assert self._pending is not None, "AWAIT_EXPORT is entered with the option to answer"
        option, fields = self._pending
        self._pending = None
        if isinstance(answer, ExportUnknown):
            self._refuse_export(option, answer)
            return
        _check_block_sizes(answer)
        if answer.tls_required and not self._tls_active and self.tls_mode is not TlsMode.NOTLS:
            # spec (SELECTIVETLS): NBD_REP_ERR_TLS_REQD only answers INFO, GO (and EXPORT_NAME closes); a meta
            # context question about a TLS-only export is refused by policy instead.
            refusal = _REP.ERR_TLS_REQD if option in (Option.INFO, Option.GO, Option.EXPORT_NAME) else _REP.ERR_POLICY
            self._refuse_export(option, ExportUnknown("this export requires TLS", refusal))
        elif option == Option.EXPORT_NAME:
            self._enter_transmission(answer, with_export_name=True)
        elif option in (Option.INFO, Option.GO):
            self._answer_info(option, answer, fields["requests"])  # type: ignore[arg-type]
        else:
            self._answer_meta_context(option, answer, fields["queries"])  # type: ignore[arg-type]

    def _refuse_export(self, option: Option, answer: ExportUnknown) -> None:
        if option == Option.EXPORT_NAME:
            # spec: NBD_OPT_EXPORT_NAME has no error reply; the only refusal is to end the session.
            self._move(Trigger.EXPORT_NAME_REFUSED)
            return
        reply_type = OptionReplyType(answer.reply_type)
        if not reply_type.is_error:
            raise LocalProtocolError(f"ExportUnknown.reply_type {reply_type.name} is not an error")
        if reply_type is _REP.ERR_TLS_REQD and (
            self._tls_active or self.tls_mode is TlsMode.NOTLS or option not in (Option.INFO, Option.GO)
        ):
            raise LocalProtocolError("NBD_REP_ERR_TLS_REQD may only answer INFO or GO, before TLS, on a TLS server")
        if reply_type is _REP.ERR_UNSUP and option == Option.GO and self.extended_headers:
            # spec (extended headers): a server that agreed to them must support NBD_OPT_GO.
            raise LocalProtocolError("NBD_OPT_GO cannot be unsupported once extended headers were agreed")
        self._error(option, reply_type, answer.message or "unknown export")
        self._move(Trigger.EXPORT_ANSWERED)

    def _transmission_flags(self, export: Export) -> int:
        flags = int(export.flags) | TransmissionFlags.HAS_FLAGS
        if not flags & TransmissionFlags.SEND_WRITE_ZEROES:
            flags &= ~int(TransmissionFlags.SEND_FAST_ZERO)  # spec: FAST_ZERO MUST be clear without WRITE_ZEROES
        if not self.structured_replies:
            flags &= ~int(TransmissionFlags.SEND_DF)
        else:
            flags |= TransmissionFlags.SEND_DF
        flags &= ~int(TransmissionFlags.BLOCK_STATUS_PAYLOAD)
        if self.extended_headers and self._meta_export == export.name and self._meta_contexts:
            flags |= TransmissionFlags.BLOCK_STATUS_PAYLOAD
        return flags

    def _maximum_payload(self, export: Export) -> int:
        """The maximum payload this connection advertises and enforces: the export's, except that a structured
        (not extended) read could not carry more than 2^32 - 9 bytes in one chunk."""
        if self.structured_replies and not self.extended_headers:
            return min(export.maximum_payload, _MAX_STRUCTURED_DATA)
        return export.maximum_payload

    def _answer_info(self, option: Option, export: Export, requests: tuple[int, ...]) -> None:
        wants_sizes = InfoType.BLOCK_SIZE in requests
        maximum = self._maximum_payload(export)
        if not wants_sizes and (export.block_size_required or export.minimum_block_size > 1):
            # spec: send the constraints first, so the client can retry without a round trip.
            self._reply(option, _REP.INFO, _replies.block_size_payload(export, maximum))
            self._error(option, _REP.ERR_BLOCK_SIZE_REQD, "this export needs NBD_INFO_BLOCK_SIZE to be requested")
            self._move(Trigger.EXPORT_ANSWERED)
            return
        if export.preferred_block_size != 4096 or maximum < DEFAULT_MAX_PAYLOAD:
            # spec ("Size constraints"): constraints other than the defaults (1, 4096, at least 32 MiB) MUST be
            # advertised, asked for or not (a client MUST ignore an information type it does not know).
            requests += (InfoType.BLOCK_SIZE,)
        flags = self._transmission_flags(export)
        self._out.extend(_replies.info_replies(option, export, flags, requests, maximum))
        self._reply(option, _REP.ACK)
        if option == Option.GO:
            self._enter_transmission(export)
        else:
            self._move(Trigger.EXPORT_ANSWERED)

    def _answer_meta_context(self, option: Option, export: Export, queries: tuple[str, ...]) -> None:
        listing = option == Option.LIST_META_CONTEXT
        chosen = match_meta_contexts(queries, export.meta_contexts, listing=listing)
        if chosen is None:
            self._error(option, _REP.ERR_INVALID, "a meta context query must start with a namespace and a colon")
            self._move(Trigger.EXPORT_ANSWERED)
            return
        # Ids are only meaningful for SET (spec: LIST replies SHOULD carry id 0).
        numbered = [(0 if listing else i + 1, name) for i, name in enumerate(chosen)]
        self._out.extend([_replies.meta_context_reply(option, context_id, name) for context_id, name in numbered])
        self._reply(option, _REP.ACK)
        if not listing:
            self._meta_export, self._meta_contexts = export.name, dict(numbered)
        self._move(Trigger.EXPORT_ANSWERED)

    def _enter_transmission(self, export: Export, with_export_name: bool = False) -> None:
        flags = self._transmission_flags(export)
        if with_export_name:
            fmt = layout.ExportNameReplyNoZeroes if self._no_zeroes else layout.ExportNameReply
            self._out.append(layout.encode(fmt, {"size": export.size, "transmission_flags": flags}))
        if self._meta_export != export.name:
            self._meta_contexts = {}
        self.export = export
        self._size = export.size
        self._flags = int(flags)  # an int: checked against every request
        self._min_block = export.minimum_block_size
        self._max_payload = self._maximum_payload(export)
        # The flags a WRITE may carry on the fast path: those the command table allows here, PAYLOAD_LEN aside.
        write = COMMANDS[Command.WRITE]
        self._plain_write_flags = frozenset({0, allowed_flags(write, flags)}) if usable(write, flags) else frozenset()
        self._request_codec = headers.EXTENDED_REQUEST if self.extended_headers else headers.REQUEST
        self._reply_form = 2 if self.extended_headers else 1 if self.structured_replies else 0
        self._move(Trigger.EXPORT_CHOSEN)
        self._events.append(
            HandshakeComplete(export, self.structured_replies, self.extended_headers, dict(self._meta_contexts))
        )
