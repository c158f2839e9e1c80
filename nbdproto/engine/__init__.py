"""nbdproto.engine: the NBD protocol for both roles, as h11 is HTTP's: bytes in, events out; events in, bytes out.

- ``_events``, ``_handshake_events``, ``_transmission_events``, ``_payloads``: the events (small slotted
  records named as the spec names the messages) and the plain data they carry.
- ``_state``: the phases of a connection and each role's transitions between them, as tables.
- ``_connection``: what both roles share (the receive buffer, the queue of bytes to send, the phase, TLS).
- ``_server*``: ``ServerConnection``, from the greeting to the last reply (its handshake and transmission
  halves in modules of their own); ``_client*``: ``ClientConnection``, likewise, and the checks of what a
  server states.
- ``_commands``: what the spec says of each command, stated once; ``_metacontexts``: meta context queries;
  ``_replies``: the server's bytes.

Nothing here does I/O or keeps time: the serving logic (``nbdproto.serving``), the client logic
(``nbdproto.client``) and the backends drive it.
"""

from __future__ import annotations

from ._client import ClientConnection
from ._events import ConnectionClosed, Event
from ._handshake_events import (
    ClientAborted,
    Export,
    ExportInfo,
    ExportList,
    ExportListing,
    ExportRequested,
    ExportUnknown,
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
from ._payloads import Extent, FileRegion, Payload
from ._server import ServerConnection
from ._server_base import WriteView
from ._state import NEED_DATA, PAUSED, HandshakeStep, Phase, TlsMode
from ._transmission_events import (
    NO_FLAGS,
    WORK_TYPES,
    BlockStatusReply,
    BlockStatusRequest,
    CacheRequest,
    DisconnectRequest,
    ErrorReply,
    FlushRequest,
    ReadData,
    ReadHole,
    ReadReply,
    ReadRequest,
    Reply,
    Request,
    ResizeRequest,
    SuccessReply,
    TrimRequest,
    WritePayload,
    WriteRequest,
    WriteZeroesRequest,
)

__all__ = [
    "Event",
    "ConnectionClosed",
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
    "NO_FLAGS",
    "ReadRequest",
    "WriteRequest",
    "WritePayload",
    "DisconnectRequest",
    "FlushRequest",
    "TrimRequest",
    "CacheRequest",
    "WriteZeroesRequest",
    "BlockStatusRequest",
    "ResizeRequest",
    "Request",
    "WORK_TYPES",
    "ReadData",
    "ReadHole",
    "ReadReply",
    "BlockStatusReply",
    "SuccessReply",
    "ErrorReply",
    "Reply",
    "Extent",
    "FileRegion",
    "Payload",
    "NEED_DATA",
    "PAUSED",
    "Phase",
    "TlsMode",
    "HandshakeStep",
    "ServerConnection",
    "ClientConnection",
    "WriteView",
]
