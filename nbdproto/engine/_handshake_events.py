"""The events of the handshake, both roles: the greeting, the options a client sends, their outcomes, and the
two ways a handshake ends (HandshakeComplete, ClientAborted).

Server role: ``ExportRequested`` asks the application to look an export up; it answers with ``send(Export(...))``
or ``send(ExportUnknown(...))``. ``Export`` is also what a client learns of the export it chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nbdproto.wire import DEFAULT_MAX_PAYLOAD, InfoType, Option, OptionReplyType, TransmissionFlags

from ._events import Event

__all__ = [
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
    "ExportListing",
    "ExportList",
    "ExportInfo",
    "MetaContexts",
    "OptionAck",
    "OptionError",
    "StartTLS",
    "HandshakeComplete",
    "ClientAborted",
]

_NO_CONTEXTS: Mapping[int, str] = MappingProxyType({})


class Export(Event):
    """What a server says about one export, and what a client learns of it.

    The server application answers ``ExportRequested`` with one; ``HandshakeComplete`` and ``ExportInfo`` carry
    the one the client learned. ``flags`` are the transmission flags (HAS_FLAGS is implied); exports are
    read-only unless the flags say otherwise (READ_ONLY is the default). ``meta_contexts``
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


class ServerGreeting(Event):
    """Client role: the server's greeting arrived. ``oldstyle`` greetings carry the export's size and flags
    and go straight to transmission (a ``HandshakeComplete`` follows); newstyle ones carry handshake flags."""

    __slots__ = ("handshake_flags", "oldstyle")

    handshake_flags: int
    oldstyle: bool

    def __init__(self, handshake_flags: int, oldstyle: bool = False) -> None:
        self.handshake_flags = handshake_flags
        self.oldstyle = oldstyle


class OptionExportName(Event):
    """NBD_OPT_EXPORT_NAME: select ``name`` and enter transmission; the server cannot answer it with an error."""

    __slots__ = ("name",)

    name: str

    def __init__(self, name: str) -> None:
        self.name = name


class OptionAbort(Event):
    """NBD_OPT_ABORT: the client ends the handshake without entering transmission."""

    __slots__ = ()


class OptionList(Event):
    """NBD_OPT_LIST: ask for the exports the server offers."""

    __slots__ = ()


class OptionStartTLS(Event):
    """NBD_OPT_STARTTLS: upgrade the connection to TLS."""

    __slots__ = ()


class _ExportQuery(Event):
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


class OptionStructuredReply(Event):
    """NBD_OPT_STRUCTURED_REPLY: ask for structured replies in transmission."""

    __slots__ = ()


class _ContextQuery(Event):
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


class OptionExtendedHeaders(Event):
    """NBD_OPT_EXTENDED_HEADERS: ask for 64-bit extended headers (implies structured replies)."""

    __slots__ = ()


class OptionRaw(Event):
    """Any option, code and payload as given: for options this library has no event for, and for tests."""

    __slots__ = ("option", "data")

    option: int
    data: bytes

    def __init__(self, option: int, data: bytes = b"") -> None:
        self.option = option
        self.data = data


class ExportRequested(Event):
    """Server role: the client named export ``name`` in ``option``; the application must answer with
    ``send(Export(...))`` or ``send(ExportUnknown(...))`` before the connection produces more events."""

    __slots__ = ("name", "option")

    name: str
    option: Option

    def __init__(self, name: str, option: Option) -> None:
        self.name = name
        self.option = option


class ExportUnknown(Event):
    """Server role: the answer to ExportRequested when no such export exists (or the client may not use it).
    ``reply_type`` is the option error to send where one can be sent (EXPORT_NAME can only be closed)."""

    __slots__ = ("message", "reply_type")

    message: str
    reply_type: OptionReplyType

    def __init__(self, message: str = "", reply_type: OptionReplyType = OptionReplyType.ERR_UNKNOWN) -> None:
        self.message = message
        self.reply_type = reply_type


class ExportListing(Event):
    """One export in the answer to NBD_OPT_LIST."""

    __slots__ = ("name", "description")

    name: str
    description: str

    def __init__(self, name: str, description: str = "") -> None:
        self.name = name
        self.description = description


class ExportList(Event):
    """Client role: the server's complete answer to NBD_OPT_LIST."""

    __slots__ = ("exports",)

    exports: tuple[ExportListing, ...]

    def __init__(self, exports: tuple[ExportListing, ...]) -> None:
        self.exports = exports


class ExportInfo(Event):
    """Client role: the server's complete, successful answer to NBD_OPT_INFO."""

    __slots__ = ("export",)

    export: Export

    def __init__(self, export: Export) -> None:
        self.export = export


class MetaContexts(Event):
    """Client role: the answer to NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT: context id -> name
    (a list has no ids: its names are numbered from 0 in the order the server sent them)."""

    __slots__ = ("option", "contexts")

    option: Option
    contexts: Mapping[int, str]

    def __init__(self, option: Option, contexts: Mapping[int, str]) -> None:
        self.option = option
        self.contexts = contexts


class OptionAck(Event):
    """Client role: the server accepted ``option`` (STRUCTURED_REPLY, EXTENDED_HEADERS, ABORT)."""

    __slots__ = ("option",)

    option: int

    def __init__(self, option: int) -> None:
        self.option = option


class OptionError(Event):
    """Client role: the server refused ``option`` with the NBD_REP_ERR_* ``reply_type``; the handshake goes on."""

    __slots__ = ("option", "reply_type", "message")

    option: int
    reply_type: int
    message: str

    def __init__(self, option: int, reply_type: int, message: str = "") -> None:
        self.option = option
        self.reply_type = reply_type
        self.message = message


class StartTLS(Event):
    """Both roles: STARTTLS was accepted. The driver must write out every pending byte, wrap the stream in TLS
    (server or client side), then call ``tls_established()``; until then the connection takes no data."""

    __slots__ = ()


class HandshakeComplete(Event):
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


class ClientAborted(Event):
    """Server role: the client sent NBD_OPT_ABORT (the outcome a server application sees as "the client gave up").
    Client role: the server acknowledged our abort. The connection is over either way."""

    __slots__ = ()
