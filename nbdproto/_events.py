"""The events that flow in and out of ServerConnection and ClientConnection.

An event is a small frozen, slotted dataclass named after what the spec calls the message or outcome. A
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
from dataclasses import dataclass, field
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

_DATACLASS = dict(frozen=True, slots=True)
# Transmission events are made once per request and reply, so they skip frozen=True: a frozen dataclass's
# __init__ sets each field through object.__setattr__, measured here at 515 ns per ReadRequest against 118 ns
# without it (bench/bench_engine.py). They are immutable by contract all the same: nothing in nbdproto changes
# an event after creating it, and callers must not either.
_HOT = dict(slots=True)

NO_FLAGS = CommandFlags(0)
"""The empty set of command flags (the default of every request)."""


class Extent(NamedTuple):
    """One block status descriptor: ``length`` bytes of the export have ``status`` (context-defined flags)."""

    length: int
    status: int


@dataclass(**_DATACLASS)
class Export:
    """What a server says about one export, and what a client learns of it.

    The server application answers ``ExportRequested`` with one; ``HandshakeComplete`` and ``ExportInfo`` carry
    the one the client learned. ``flags`` are the transmission flags (HAS_FLAGS is implied); exports are
    read-only unless the flags say otherwise (the seed's default). ``meta_contexts``
    lists the context names the export supports (server role); ``tls_required`` marks an export that only
    TLS clients may select (the spec's SELECTIVETLS mode). ``block_size_required`` makes the server refuse
    NBD_OPT_GO with NBD_REP_ERR_BLOCK_SIZE_REQD unless the client asked for NBD_INFO_BLOCK_SIZE.
    ``block_sizes_known`` is True where the server sent NBD_INFO_BLOCK_SIZE (client role) or wants it sent.
    """

    name: str
    size: int
    flags: TransmissionFlags = TransmissionFlags.HAS_FLAGS | TransmissionFlags.READ_ONLY
    description: str = ""
    minimum_block_size: int = 1
    preferred_block_size: int = 4096
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    meta_contexts: tuple[str, ...] = ()
    block_sizes_known: bool = True
    block_size_required: bool = False
    tls_required: bool = False

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlags.READ_ONLY)


# --- Handshake ----------------------------------------------------------------------------------------------


@dataclass(**_DATACLASS)
class ServerGreeting:
    """Client role: the server's greeting arrived. ``oldstyle`` greetings carry the export's size and flags
    and go straight to transmission (a ``HandshakeComplete`` follows); newstyle ones carry handshake flags."""

    handshake_flags: int
    oldstyle: bool = False


@dataclass(**_DATACLASS)
class OptionExportName:
    """NBD_OPT_EXPORT_NAME: select ``name`` and enter transmission; the server cannot answer it with an error."""

    name: str


@dataclass(**_DATACLASS)
class OptionAbort:
    """NBD_OPT_ABORT: the client ends the handshake without entering transmission."""


@dataclass(**_DATACLASS)
class OptionList:
    """NBD_OPT_LIST: ask for the exports the server offers."""


@dataclass(**_DATACLASS)
class OptionStartTLS:
    """NBD_OPT_STARTTLS: upgrade the connection to TLS."""


@dataclass(**_DATACLASS)
class OptionInfo:
    """NBD_OPT_INFO: describe export ``name``; ``requests`` are the NBD_INFO_* types wanted beyond EXPORT."""

    name: str
    requests: tuple[InfoType, ...] = ()


@dataclass(**_DATACLASS)
class OptionGo:
    """NBD_OPT_GO: like OptionInfo, then enter transmission with that export on success."""

    name: str
    requests: tuple[InfoType, ...] = ()


@dataclass(**_DATACLASS)
class OptionStructuredReply:
    """NBD_OPT_STRUCTURED_REPLY: ask for structured replies in transmission."""


@dataclass(**_DATACLASS)
class OptionListMetaContext:
    """NBD_OPT_LIST_META_CONTEXT: which contexts of export ``name`` match ``queries`` (all when empty)."""

    name: str
    queries: tuple[str, ...] = ()


@dataclass(**_DATACLASS)
class OptionSetMetaContext:
    """NBD_OPT_SET_META_CONTEXT: select the contexts of export ``name`` that match ``queries``."""

    name: str
    queries: tuple[str, ...] = ()


@dataclass(**_DATACLASS)
class OptionExtendedHeaders:
    """NBD_OPT_EXTENDED_HEADERS: ask for 64-bit extended headers (implies structured replies)."""


@dataclass(**_DATACLASS)
class OptionRaw:
    """Any option, code and payload as given: for options this library has no event for, and for tests."""

    option: int
    data: bytes = b""


@dataclass(**_DATACLASS)
class ExportRequested:
    """Server role: the client named export ``name`` in ``option``; the application must answer with
    ``send(Export(...))`` or ``send(ExportUnknown(...))`` before the connection produces more events."""

    name: str
    option: Option


@dataclass(**_DATACLASS)
class ExportUnknown:
    """Server role: the answer to ExportRequested when no such export exists (or the client may not use it).
    ``reply_type`` is the option error to send where one can be sent (EXPORT_NAME can only be closed)."""

    message: str = ""
    reply_type: OptionReplyType = OptionReplyType.ERR_UNKNOWN


@dataclass(**_DATACLASS)
class ExportListing:
    """One export in the answer to NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(**_DATACLASS)
class ExportList:
    """Client role: the server's complete answer to NBD_OPT_LIST."""

    exports: tuple[ExportListing, ...]


@dataclass(**_DATACLASS)
class ExportInfo:
    """Client role: the server's complete, successful answer to NBD_OPT_INFO."""

    export: Export


@dataclass(**_DATACLASS)
class MetaContexts:
    """Client role: the answer to NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT: context id -> name
    (ids are meaningless for a list)."""

    option: Option
    contexts: Mapping[int, str]


@dataclass(**_DATACLASS)
class OptionAck:
    """Client role: the server accepted ``option`` (STRUCTURED_REPLY, EXTENDED_HEADERS, ABORT)."""

    option: int


@dataclass(**_DATACLASS)
class OptionError:
    """Client role: the server refused ``option`` with the NBD_REP_ERR_* ``reply_type``; the handshake goes on."""

    option: int
    reply_type: int
    message: str = ""


@dataclass(**_DATACLASS)
class StartTLS:
    """Both roles: STARTTLS was accepted. The driver must write out every pending byte, wrap the stream in TLS
    (server or client side), then call ``tls_established()``; until then the connection takes no data."""


@dataclass(**_DATACLASS)
class HandshakeComplete:
    """Both roles: transmission begins with ``export``. ``meta_contexts`` maps the ids agreed with
    NBD_OPT_SET_META_CONTEXT to their names."""

    export: Export
    structured_replies: bool = False
    extended_headers: bool = False
    meta_contexts: Mapping[int, str] = field(default_factory=dict)


@dataclass(**_DATACLASS)
class ClientAborted:
    """Server role: the client sent NBD_OPT_ABORT (the seed's "client requested abort" outcome). Client role:
    the server acknowledged our abort. The connection is over either way."""


# --- Transmission requests -----------------------------------------------------------------------------------
# Requests are on the hot path: keep them flat, with the fields in wire order.


@dataclass(**_HOT)
class ReadRequest:
    """NBD_CMD_READ of ``length`` bytes at ``offset``. Client role: ``buffer``, if given, is where the reply's
    data is assembled (a writable buffer of ``length`` bytes); otherwise the connection allocates one."""

    cookie: int
    offset: int
    length: int
    flags: CommandFlags = NO_FLAGS
    buffer: memoryview | bytearray | None = field(default=None, compare=False, repr=False)


@dataclass(**_HOT)
class WriteRequest:
    """NBD_CMD_WRITE of ``data`` at ``offset`` (FUA may be set in ``flags``)."""

    cookie: int
    offset: int
    data: bytes | bytearray | memoryview
    flags: CommandFlags = NO_FLAGS


@dataclass(**_HOT)
class DisconnectRequest:
    """NBD_CMD_DISC: the client is done; the server finishes what is in flight, then closes. No reply."""

    cookie: int = 0


@dataclass(**_HOT)
class FlushRequest:
    """NBD_CMD_FLUSH: make every completed write durable."""

    cookie: int
    flags: CommandFlags = NO_FLAGS


@dataclass(**_HOT)
class TrimRequest:
    """NBD_CMD_TRIM: ``length`` bytes at ``offset`` need not be kept (they read back as anything)."""

    cookie: int
    offset: int
    length: int
    flags: CommandFlags = NO_FLAGS


@dataclass(**_HOT)
class CacheRequest:
    """NBD_CMD_CACHE: prefetch ``length`` bytes at ``offset``."""

    cookie: int
    offset: int
    length: int
    flags: CommandFlags = NO_FLAGS


@dataclass(**_HOT)
class WriteZeroesRequest:
    """NBD_CMD_WRITE_ZEROES: ``length`` bytes at ``offset`` read back as zero. Without NO_HOLE the server may
    punch a hole; with FAST_ZERO it must fail quickly (ENOTSUP) rather than write zeroes slowly."""

    cookie: int
    offset: int
    length: int
    flags: CommandFlags = NO_FLAGS


@dataclass(**_HOT)
class BlockStatusRequest:
    """NBD_CMD_BLOCK_STATUS for ``length`` bytes at ``offset``. ``context_ids`` are the meta contexts to
    answer for: all agreed ones, or the subset an extended request's payload named (server role); empty on
    the client side means all."""

    cookie: int
    offset: int
    length: int
    flags: CommandFlags = NO_FLAGS
    context_ids: tuple[int, ...] = ()


@dataclass(**_HOT)
class ResizeRequest:
    """NBD_CMD_RESIZE (experimental extension): change the export's size to ``size`` bytes."""

    cookie: int
    size: int
    flags: CommandFlags = NO_FLAGS


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


@dataclass(**_HOT)
class ReadData:
    """Server role: ``data`` read at ``offset`` for read ``cookie``. One chunk covering the whole request is
    the common case; several (with ReadHole) may cover it in pieces when structured replies are in use. With
    simple replies the pieces must arrive in order and cover the request exactly. ``done`` ends the reply.
    ``data`` is queued as it is, never copied: a buffer, or a FileRegion (see there)."""

    cookie: int
    offset: int
    data: Payload
    done: bool = True


@dataclass(**_HOT)
class ReadHole:
    """Server role: ``length`` bytes at ``offset`` of read ``cookie`` read as zeroes (an OFFSET_HOLE chunk, or
    zero bytes in a simple reply)."""

    cookie: int
    offset: int
    length: int
    done: bool = False


@dataclass(**_HOT)
class ReadReply:
    """Client role: read ``cookie`` completed; ``data`` is the caller's buffer (or one the connection made),
    filled with the whole request's bytes (holes zeroed)."""

    cookie: int
    data: memoryview


@dataclass(**_HOT)
class BlockStatusReply:
    """Both roles: block status for ``cookie``: for each meta context id, extents from the request's offset.
    The server sends it whole; the client receives it once every context's chunk arrived."""

    cookie: int
    extents: Mapping[int, tuple[Extent, ...]]


@dataclass(**_HOT)
class SuccessReply:
    """Both roles: request ``cookie`` (not a read or block status) succeeded."""

    cookie: int


@dataclass(**_HOT)
class ErrorReply:
    """Both roles: request ``cookie`` failed with ``error``; ``message`` is for humans; ``offset`` is where the
    failure happened, when the server knows it (ERROR_OFFSET)."""

    cookie: int
    error: Errno
    message: str = ""
    offset: int | None = None


@dataclass(**_DATACLASS)
class ConnectionClosed:
    """The peer closed its end of the stream."""


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
