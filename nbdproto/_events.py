"""Every event, by phase (see ``_event`` for what an event is): the index the rest of nbdproto imports from.

- ``_event``: the ``Event`` base, and ``ConnectionClosed`` (the peer closed the stream; both phases).
- ``_handshakeevents``: the greeting, options and their outcomes, ``HandshakeComplete``, ``ClientAborted``.
- ``_transmissionevents``: requests and replies.
- ``_payloads``: the plain data events carry (``Extent``, ``FileRegion``, ``Payload``).
"""

from __future__ import annotations

from ._event import (
    ConnectionClosed as ConnectionClosed,
)
from ._event import (
    Event as Event,
)
from ._handshakeevents import (
    ClientAborted as ClientAborted,
)
from ._handshakeevents import (
    Export as Export,
)
from ._handshakeevents import (
    ExportInfo as ExportInfo,
)
from ._handshakeevents import (
    ExportList as ExportList,
)
from ._handshakeevents import (
    ExportListing as ExportListing,
)
from ._handshakeevents import (
    ExportRequested as ExportRequested,
)
from ._handshakeevents import (
    ExportUnknown as ExportUnknown,
)
from ._handshakeevents import (
    HandshakeComplete as HandshakeComplete,
)
from ._handshakeevents import (
    MetaContexts as MetaContexts,
)
from ._handshakeevents import (
    OptionAbort as OptionAbort,
)
from ._handshakeevents import (
    OptionAck as OptionAck,
)
from ._handshakeevents import (
    OptionError as OptionError,
)
from ._handshakeevents import (
    OptionExportName as OptionExportName,
)
from ._handshakeevents import (
    OptionExtendedHeaders as OptionExtendedHeaders,
)
from ._handshakeevents import (
    OptionGo as OptionGo,
)
from ._handshakeevents import (
    OptionInfo as OptionInfo,
)
from ._handshakeevents import (
    OptionList as OptionList,
)
from ._handshakeevents import (
    OptionListMetaContext as OptionListMetaContext,
)
from ._handshakeevents import (
    OptionRaw as OptionRaw,
)
from ._handshakeevents import (
    OptionSetMetaContext as OptionSetMetaContext,
)
from ._handshakeevents import (
    OptionStartTLS as OptionStartTLS,
)
from ._handshakeevents import (
    OptionStructuredReply as OptionStructuredReply,
)
from ._handshakeevents import (
    ServerGreeting as ServerGreeting,
)
from ._handshakeevents import (
    StartTLS as StartTLS,
)
from ._payloads import (
    Extent as Extent,
)
from ._payloads import (
    FileRegion as FileRegion,
)
from ._payloads import (
    Payload as Payload,
)
from ._transmissionevents import (
    NO_FLAGS as NO_FLAGS,
)
from ._transmissionevents import (
    BlockStatusReply as BlockStatusReply,
)
from ._transmissionevents import (
    BlockStatusRequest as BlockStatusRequest,
)
from ._transmissionevents import (
    CacheRequest as CacheRequest,
)
from ._transmissionevents import (
    DisconnectRequest as DisconnectRequest,
)
from ._transmissionevents import (
    ErrorReply as ErrorReply,
)
from ._transmissionevents import (
    FlushRequest as FlushRequest,
)
from ._transmissionevents import (
    ReadData as ReadData,
)
from ._transmissionevents import (
    ReadHole as ReadHole,
)
from ._transmissionevents import (
    ReadReply as ReadReply,
)
from ._transmissionevents import (
    ReadRequest as ReadRequest,
)
from ._transmissionevents import (
    Reply as Reply,
)
from ._transmissionevents import (
    Request as Request,
)
from ._transmissionevents import (
    ResizeRequest as ResizeRequest,
)
from ._transmissionevents import (
    SuccessReply as SuccessReply,
)
from ._transmissionevents import (
    TrimRequest as TrimRequest,
)
from ._transmissionevents import (
    WritePayload as WritePayload,
)
from ._transmissionevents import (
    WriteRequest as WriteRequest,
)
from ._transmissionevents import (
    WriteZeroesRequest as WriteZeroesRequest,
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
]
