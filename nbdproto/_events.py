"""The events that flow in and out of ServerConnection and ClientConnection.

An event is a small slotted record (``_Event``) named after what the spec calls the message or outcome. A
connection's ``next_event()`` returns the events its peer caused; ``send(event)`` takes the events our side
causes. Which role may send or receive which event is the connection's business; the events themselves only
carry data.

Groups:
- Handshake, both roles: ``ServerGreeting``, option requests (``Option*``), their outcomes (``ExportList``,
  ``ExportInfo``, ``MetaContexts``, ``OptionAck``, ``OptionError``), ``StartTLS``, ``HandshakeComplete``,
  ``ClientAborted``.
- Handshake, server role: ``ExportRequested`` asks the application to look an export up; it answers with
  ``send(Export(...))`` or ``send(ExportUnknown(...))``.
- Transmission requests (client sends, server receives): ``ReadRequest`` ... ``DisconnectRequest``.
- Transmission replies: the server sends ``ReadData`` / ``ReadHole`` chunks, ``BlockStatusReply``,
  ``SuccessReply`` and ``ErrorReply``; the client receives one complete reply per request: ``ReadReply``,
  ``BlockStatusReply``, ``SuccessReply`` or ``ErrorReply``.
- ``ConnectionClosed``: the peer closed the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from ._constants import (
    DEFAULT_MAX_PAYLOAD,
    CommandFlags,
    Errno,
    InfoType,
    Option,
    OptionReplyType,
    TransmissionFlags,
)

__all__ = [
    "NO_FLAGS",
    "FileRegion",
    "Payload",
    "Event",
    "Extent",
    "Export",
    "ServerGreeting",
    "OptionExportName",
    "OptionAbort",
    "OptionList",
    "OptionStartTLS",
    "OptionInfo",
    "OptionGo",
    "OptionStructuredReply",
    "OptionListMetaContext",
    "OptionSetMetaContext",
    "OptionExtendedHeaders",
    "OptionRaw",
    "ExportRequested",
    "ExportUnknown",
    "ExportList",
    "ExportListing",
    "ExportInfo",
    "MetaContexts",
    "OptionAck",
    "OptionError",
    "StartTLS",
    "HandshakeComplete",
    "ClientAborted",
    "ReadRequest",
    "WriteRequest",
    "DisconnectRequest",
    "FlushRequest",
    "TrimRequest",
    "CacheRequest",
    "WriteZeroesRequest",
    "BlockStatusRequest",
    "ResizeRequest",
    "Request",
    "ReadData",
    "ReadHole",
    "ReadReply",
    "BlockStatusReply",
    "SuccessReply",
    "ErrorReply",
    "ConnectionClosed",
]


class _Event:
    """The base of every event: a plain slotted record whose fields are its ``__slots__``, in order.

    Events are written out by hand rather than as dataclasses: forty dataclasses cost ~10 ms of every
    start-up (nbdproto copy's measured time includes it), and an event made per request must be cheap to
    create (a frozen dataclass's __init__ measured 515 ns per ReadRequest against 118 ns for a plain one).
    Events are immutable by contract: nothing in nbdproto changes an event after creating it, and callers
    must not either. Equal when of the same type with equal fields (``_hidden`` ones aside); hashable so.
    """

    __slots__: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()
    """Fields left out of ==, hash() and repr() (a read's buffer is where data goes, not what it asks)."""

    _fields: tuple[str, ...] = ()
    """Every field of the class, its bases' first (a shared private base holds the fields of a group)."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._fields = (*cls._fields, *cls.__slots__)

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields if name not in self._hidden)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields if name not in self._hidden)
        return f"{type(self).__name__}({fields})"


_NO_CONTEXTS: Mapping[int, str] = MappingProxyType({})

NO_FLAGS = CommandFlags(0)
"""The empty set of command flags (the default of every request)."""


class Extent(NamedTuple):
    """One block status descriptor: ``length`` bytes of the export have ``status`` (context-defined flags)."""

    length: int
    status: int


class Export(_Event):
    """What a server says about one export, and what a client learns of it.

    The server application answers ``ExportRequested`` with one; ``HandshakeComplete`` and ``ExportInfo`` carry
    the one the client learned. ``flags`` are the transmission flags (HAS_FLAGS is implied); exports are
    read-only unless the flags say otherwise (the seed's default). ``meta_contexts``
    lists the context names the export supports (server role); ``tls_required`` marks an export that only
    TLS clients may select (the spec's SELECTIVETLS mode). ``block_size_required`` makes the server refuse
    NBD_OPT_GO with NBD_REP_ERR_BLOCK_SIZE_REQD unless the client asked for NBD_INFO_BLOCK_SIZE.
    ``block_sizes_known`` is True where the server sent NBD_INFO_BLOCK_SIZE (client role) or wants it sent.
    """

    __slots__ = (
        "name",
        "size",
        "flags",
        "description",
        "minimum_block_size",
        "preferred_block_size",
        "maximum_payload",
        "meta_contexts",
        "block_sizes_known",
        "block_size_required",
        "tls_required",
    )

    name: str
    size: int
    flags: TransmissionFlags
    description: str
    minimum_block_size: int
    preferred_block_size: int
    maximum_payload: int
    meta_contexts: tuple[str, ...]
    block_sizes_known: bool
    block_size_required: bool
    tls_required: bool

    def __init__(
        self,
        name: str,
        size: int,
        flags: TransmissionFlags = TransmissionFlags.HAS_FLAGS | TransmissionFlags.READ_ONLY,
        description: str = "",
        minimum_block_size: int = 1,
        preferred_block_size: int = 4096,
        maximum_payload: int = DEFAULT_MAX_PAYLOAD,
        meta_contexts: tuple[str, ...] = (),
        block_sizes_known: bool = True,
        block_size_required: bool = False,
        tls_required: bool = False,
    ) -> None:
        self.name = name
        self.size = size
        self.flags = flags
        self.description = description
        self.minimum_block_size = minimum_block_size
        self.preferred_block_size = preferred_block_size
        self.maximum_payload = maximum_payload
        self.meta_contexts = meta_contexts
        self.block_sizes_known = block_sizes_known
        self.block_size_required = block_size_required
        self.tls_required = tls_required

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlags.READ_ONLY)


# --- Handshake ----------------------------------------------------------------------------------------------


class ServerGreeting(_Event):
    """Client role: the server's greeting arrived. ``oldstyle`` greetings carry the export's size and flags
    and go straight to transmission (a ``HandshakeComplete`` follows); newstyle ones carry handshake flags."""

    __slots__ = ("handshake_flags", "oldstyle")

    handshake_flags: int
    oldstyle: bool

    def __init__(self, handshake_flags: int, oldstyle: bool = False) -> None:
        self.handshake_flags = handshake_flags
        self.oldstyle = oldstyle


class OptionExportName(_Event):
    """NBD_OPT_EXPORT_NAME: select ``name`` and enter transmission; the server cannot answer it with an error."""

    __slots__ = ("name",)

    name: str

    def __init__(self, name: str) -> None:
        self.name = name


class OptionAbort(_Event):
    """NBD_OPT_ABORT: the client ends the handshake without entering transmission."""

    __slots__ = ()


class OptionList(_Event):
    """NBD_OPT_LIST: ask for the exports the server offers."""

    __slots__ = ()


class OptionStartTLS(_Event):
    """NBD_OPT_STARTTLS: upgrade the connection to TLS."""

    __slots__ = ()


class _ExportQuery(_Event):
    """What NBD_OPT_INFO and NBD_OPT_GO carry: export ``name`` and the NBD_INFO_* types wanted beyond EXPORT."""

    __slots__ = ("name", "requests")

    name: str
    requests: tuple[InfoType, ...]

    def __init__(self, name: str, requests: tuple[InfoType, ...] = ()) -> None:
        self.name = name
        self.requests = requests


class OptionInfo(_ExportQuery):
    """NBD_OPT_INFO: describe export ``name``; ``requests`` are the NBD_INFO_* types wanted beyond EXPORT."""

    __slots__ = ()


class OptionGo(_ExportQuery):
    """NBD_OPT_GO: like OptionInfo, then enter transmission with that export on success."""

    __slots__ = ()


class OptionStructuredReply(_Event):
    """NBD_OPT_STRUCTURED_REPLY: ask for structured replies in transmission."""

    __slots__ = ()


class _ContextQuery(_Event):
    """What NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT carry: export ``name`` and ``queries``."""

    __slots__ = ("name", "queries")

    name: str
    queries: tuple[str, ...]

    def __init__(self, name: str, queries: tuple[str, ...] = ()) -> None:
        self.name = name
        self.queries = queries


class OptionListMetaContext(_ContextQuery):
    """NBD_OPT_LIST_META_CONTEXT: which contexts of export ``name`` match ``queries`` (all when empty)."""

    __slots__ = ()


class OptionSetMetaContext(_ContextQuery):
    """NBD_OPT_SET_META_CONTEXT: select the contexts of export ``name`` that match ``queries``."""

    __slots__ = ()


class OptionExtendedHeaders(_Event):
    """NBD_OPT_EXTENDED_HEADERS: ask for 64-bit extended headers (implies structured replies)."""

    __slots__ = ()


class OptionRaw(_Event):
    """Any option, code and payload as given: for options this library has no event for, and for tests."""

    __slots__ = ("option", "data")

    option: int
    data: bytes

    def __init__(self, option: int, data: bytes = b"") -> None:
        self.option = option
        self.data = data


class ExportRequested(_Event):
    """Server role: the client named export ``name`` in ``option``; the application must answer with
    ``send(Export(...))`` or ``send(ExportUnknown(...))`` before the connection produces more events."""

    __slots__ = ("name", "option")

    name: str
    option: Option

    def __init__(self, name: str, option: Option) -> None:
        self.name = name
        self.option = option


class ExportUnknown(_Event):
    """Server role: the answer to ExportRequested when no such export exists (or the client may not use it).
    ``reply_type`` is the option error to send where one can be sent (EXPORT_NAME can only be closed)."""

    __slots__ = ("message", "reply_type")

    message: str
    reply_type: OptionReplyType

    def __init__(self, message: str = "", reply_type: OptionReplyType = OptionReplyType.ERR_UNKNOWN) -> None:
        self.message = message
        self.reply_type = reply_type


class ExportListing(_Event):
    """One export in the answer to NBD_OPT_LIST."""

    __slots__ = ("name", "description")

    name: str
    description: str

    def __init__(self, name: str, description: str = "") -> None:
        self.name = name
        self.description = description


class ExportList(_Event):
    """Client role: the server's complete answer to NBD_OPT_LIST."""

    __slots__ = ("exports",)

    exports: tuple[ExportListing, ...]

    def __init__(self, exports: tuple[ExportListing, ...]) -> None:
        self.exports = exports


class ExportInfo(_Event):
    """Client role: the server's complete, successful answer to NBD_OPT_INFO."""

    __slots__ = ("export",)

    export: Export

    def __init__(self, export: Export) -> None:
        self.export = export


class MetaContexts(_Event):
    """Client role: the answer to NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT: context id -> name
    (a list has no ids: its names are numbered from 0 in the order the server sent them)."""

    __slots__ = ("option", "contexts")

    option: Option
    contexts: Mapping[int, str]

    def __init__(self, option: Option, contexts: Mapping[int, str]) -> None:
        self.option = option
        self.contexts = contexts


class OptionAck(_Event):
    """Client role: the server accepted ``option`` (STRUCTURED_REPLY, EXTENDED_HEADERS, ABORT)."""

    __slots__ = ("option",)

    option: int

    def __init__(self, option: int) -> None:
        self.option = option


class OptionError(_Event):
    """Client role: the server refused ``option`` with the NBD_REP_ERR_* ``reply_type``; the handshake goes on."""

    __slots__ = ("option", "reply_type", "message")

    option: int
    reply_type: int
    message: str

    def __init__(self, option: int, reply_type: int, message: str = "") -> None:
        self.option = option
        self.reply_type = reply_type
        self.message = message


class StartTLS(_Event):
    """Both roles: STARTTLS was accepted. The driver must write out every pending byte, wrap the stream in TLS
    (server or client side), then call ``tls_established()``; until then the connection takes no data."""

    __slots__ = ()


class HandshakeComplete(_Event):
    """Both roles: transmission begins with ``export``. ``meta_contexts`` maps the ids agreed with
    NBD_OPT_SET_META_CONTEXT to their names."""

    __slots__ = ("export", "structured_replies", "extended_headers", "meta_contexts")

    export: Export
    structured_replies: bool
    extended_headers: bool
    meta_contexts: Mapping[int, str]

    def __init__(
        self,
        export: Export,
        structured_replies: bool = False,
        extended_headers: bool = False,
        meta_contexts: Mapping[int, str] = _NO_CONTEXTS,
    ) -> None:
        self.export = export
        self.structured_replies = structured_replies
        self.extended_headers = extended_headers
        self.meta_contexts = meta_contexts


class ClientAborted(_Event):
    """Server role: the client sent NBD_OPT_ABORT (the seed's "client requested abort" outcome). Client role:
    the server acknowledged our abort. The connection is over either way."""

    __slots__ = ()


# --- Transmission requests -----------------------------------------------------------------------------------
# Requests are on the hot path: keep them flat, with the fields in wire order.


class ReadRequest(_Event):
    """NBD_CMD_READ of ``length`` bytes at ``offset``. Client role: ``buffer``, if given, is where the reply's
    data is assembled (a writable buffer of ``length`` bytes); otherwise the connection allocates one."""

    __slots__ = ("cookie", "offset", "length", "flags", "buffer")
    _hidden = ("buffer",)

    cookie: int
    offset: int
    length: int
    flags: CommandFlags
    buffer: memoryview | bytearray | None

    def __init__(
        self,
        cookie: int,
        offset: int,
        length: int,
        flags: CommandFlags = NO_FLAGS,
        buffer: memoryview | bytearray | None = None,
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buffer = buffer


class WriteRequest(_Event):
    """NBD_CMD_WRITE of ``data`` at ``offset`` (FUA may be set in ``flags``)."""

    __slots__ = ("cookie", "offset", "data", "flags")

    cookie: int
    offset: int
    data: bytes | bytearray | memoryview
    flags: CommandFlags

    def __init__(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview, flags: CommandFlags = NO_FLAGS
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.flags = flags


class DisconnectRequest(_Event):
    """NBD_CMD_DISC: the client is done; the server finishes what is in flight, then closes. No reply."""

    __slots__ = ("cookie",)

    cookie: int

    def __init__(self, cookie: int = 0) -> None:
        self.cookie = cookie


class FlushRequest(_Event):
    """NBD_CMD_FLUSH: make every completed write durable."""

    __slots__ = ("cookie", "flags")

    cookie: int
    flags: CommandFlags

    def __init__(self, cookie: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.flags = flags


class _RangeRequest(_Event):
    """A request for ``length`` bytes at ``offset`` that carries no data either way (TRIM, CACHE, WRITE_ZEROES)."""

    __slots__ = ("cookie", "offset", "length", "flags")

    cookie: int
    offset: int
    length: int
    flags: CommandFlags

    def __init__(self, cookie: int, offset: int, length: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags


class TrimRequest(_RangeRequest):
    """NBD_CMD_TRIM: ``length`` bytes at ``offset`` need not be kept (they read back as anything)."""

    __slots__ = ()


class CacheRequest(_RangeRequest):
    """NBD_CMD_CACHE: prefetch ``length`` bytes at ``offset``."""

    __slots__ = ()


class WriteZeroesRequest(_RangeRequest):
    """NBD_CMD_WRITE_ZEROES: ``length`` bytes at ``offset`` read back as zero. Without NO_HOLE the server may
    punch a hole; with FAST_ZERO it must fail quickly (ENOTSUP) rather than write zeroes slowly."""

    __slots__ = ()


class BlockStatusRequest(_Event):
    """NBD_CMD_BLOCK_STATUS for ``length`` bytes at ``offset``. ``context_ids`` are the meta contexts to
    answer for: all agreed ones, or the subset an extended request's payload named (server role); empty on
    the client side means all."""

    __slots__ = ("cookie", "offset", "length", "flags", "context_ids")

    cookie: int
    offset: int
    length: int
    flags: CommandFlags
    context_ids: tuple[int, ...]

    def __init__(
        self, cookie: int, offset: int, length: int, flags: CommandFlags = NO_FLAGS, context_ids: tuple[int, ...] = ()
    ) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.flags = flags
        self.context_ids = context_ids


class ResizeRequest(_Event):
    """NBD_CMD_RESIZE (experimental extension): change the export's size to ``size`` bytes."""

    __slots__ = ("cookie", "size", "flags")

    cookie: int
    size: int
    flags: CommandFlags

    def __init__(self, cookie: int, size: int, flags: CommandFlags = NO_FLAGS) -> None:
        self.cookie = cookie
        self.size = size
        self.flags = flags


Request = (
    ReadRequest
    | WriteRequest
    | DisconnectRequest
    | FlushRequest
    | TrimRequest
    | CacheRequest
    | WriteZeroesRequest
    | BlockStatusRequest
    | ResizeRequest
)

# --- Transmission replies ------------------------------------------------------------------------------------


class FileRegion:
    """``length`` bytes of an open file at ``offset``, standing in for a read reply's data.

    The engine never reads payloads, it only queues them: a driver that can send straight from a file (os.sendfile
    on a plaintext socket) passes a FileRegion as ReadData's data and finds it again among the pieces to send,
    so the bytes go from the page cache to the socket without passing through Python.
    """

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"FileRegion(fd={self.fd}, offset={self.offset}, length={self.length})"


Payload = bytes | bytearray | memoryview | FileRegion
"""What a reply's data may be: any buffer, or a FileRegion for drivers that send from files."""


class ReadData(_Event):
    """Server role: ``data`` read at ``offset`` for read ``cookie``. One chunk covering the whole request is
    the common case; several (with ReadHole) may cover it in pieces when structured replies are in use. With
    simple replies the pieces must arrive in order and cover the request exactly. ``done`` ends the reply.
    ``data`` is queued as it is, never copied: a buffer, or a FileRegion (see there)."""

    __slots__ = ("cookie", "offset", "data", "done")

    cookie: int
    offset: int
    data: Payload
    done: bool

    def __init__(self, cookie: int, offset: int, data: Payload, done: bool = True) -> None:
        self.cookie = cookie
        self.offset = offset
        self.data = data
        self.done = done


class ReadHole(_Event):
    """Server role: ``length`` bytes at ``offset`` of read ``cookie`` read as zeroes (an OFFSET_HOLE chunk, or
    zero bytes in a simple reply)."""

    __slots__ = ("cookie", "offset", "length", "done")

    cookie: int
    offset: int
    length: int
    done: bool

    def __init__(self, cookie: int, offset: int, length: int, done: bool = False) -> None:
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.done = done


class ReadReply(_Event):
    """Client role: read ``cookie`` completed; ``data`` is the caller's buffer (or one the connection made),
    filled with the whole request's bytes (holes zeroed)."""

    __slots__ = ("cookie", "data")

    cookie: int
    data: memoryview

    def __init__(self, cookie: int, data: memoryview) -> None:
        self.cookie = cookie
        self.data = data


class BlockStatusReply(_Event):
    """Both roles: block status for ``cookie``: for each meta context id, extents from the request's offset.
    The server sends it whole; the client receives it once every context's chunk arrived."""

    __slots__ = ("cookie", "extents")

    cookie: int
    extents: Mapping[int, tuple[Extent, ...]]

    def __init__(self, cookie: int, extents: Mapping[int, tuple[Extent, ...]]) -> None:
        self.cookie = cookie
        self.extents = extents


class SuccessReply(_Event):
    """Both roles: request ``cookie`` (not a read or block status) succeeded."""

    __slots__ = ("cookie",)

    cookie: int

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie


class ErrorReply(_Event):
    """Both roles: request ``cookie`` failed with ``error``; ``message`` is for humans; ``offset`` is where the
    failure happened, when the server knows it (ERROR_OFFSET)."""

    __slots__ = ("cookie", "error", "message", "offset")

    cookie: int
    error: Errno
    message: str
    offset: int | None

    def __init__(self, cookie: int, error: Errno, message: str = "", offset: int | None = None) -> None:
        self.cookie = cookie
        self.error = error
        self.message = message
        self.offset = offset


class ConnectionClosed(_Event):
    """The peer closed its end of the stream."""

    __slots__ = ()


Event = (
    ServerGreeting
    | OptionExportName
    | OptionAbort
    | OptionList
    | OptionStartTLS
    | OptionInfo
    | OptionGo
    | OptionStructuredReply
    | OptionListMetaContext
    | OptionSetMetaContext
    | OptionExtendedHeaders
    | OptionRaw
    | ExportRequested
    | Export
    | ExportUnknown
    | ExportList
    | ExportInfo
    | MetaContexts
    | OptionAck
    | OptionError
    | StartTLS
    | HandshakeComplete
    | ClientAborted
    | Request
    | ReadData
    | ReadHole
    | ReadReply
    | BlockStatusReply
    | SuccessReply
    | ErrorReply
    | ConnectionClosed
)
