"""nbdproto: the Network Block Device protocol as a sans-IO engine (bytes in, events out; events in, bytes out).

Everything public is re-exported here; the modules behind it are private and each has one job. The server's
names are loaded on first use (PEP 562): a client's start-up (``nbdproto copy``) should not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._client import ClientConnection
from ._clientsession import Awaiting, Blocking, ClientRequests, ClientSessionLogic, ConnectOptions
from ._constants import *  # noqa: F403
from ._constants import __all__ as _constants_all
from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._events import *  # noqa: F403
from ._events import __all__ as _events_all
from ._lazynames import lazy_names
from ._negotiation import ClientNegotiation, ExportDetails, Inquiry, NegotiationError, plan_connection
from ._sending import step_past
from ._state import NEED_DATA, PAUSED, HandshakeStep, Phase, TlsMode
from ._uri import NbdUri, connect_error, format_uri, looks_like_uri, parse_uri

if TYPE_CHECKING:
    from ._admission import ClientCount, ClientInfo, ClientRefused, ConnectionPolicy, certificate_subject, takes_client
    from ._budget import DEFAULT_MEMORY_LIMIT, BudgetShare, MemoryBudget, MemoryShare, RequestBudget, request_cost
    from ._device import BlockDevice, Buffer, Dispatch, dispatch_of
    from ._dispatch import (
        DeviceCall,
        OnError,
        ReadView,
        WriteView,
        carry_out,
        carry_out_all,
        device_calls,
        error_reply_for,
        nbd_errno,
        read_view_of,
        reply_for,
        write_view_of,
    )
    from ._export import DeviceCapabilities, ExportSpec, answer_export_request, capabilities_of, export_for
    from ._limits import DEFAULT_LIMITS, ServerLimits
    from ._receivesize import RECV_SIZE, STREAM_RECV_SIZE, ReceiveSize
    from ._server import ServerConnection
    from ._servercore import (
        ACCEPT_HOLD_BACK,
        ClientResolver,
        Exports,
        Resolver,
        ServerCore,
        ServerOptions,
        SessionSettings,
        Stoppable,
        current_connection,
        enter_connection,
    )
    from ._serverlog import ConnectionLog
    from ._serving import (
        FLUSH_AT,
        READY_IN_A_ROW,
        RECEIVE,
        RECEIVE_READY,
        STREAM_WRITES_OVER,
        BatchEnd,
        ServerSessionLogic,
        Work,
    )

_LAZY = {
    "ClientCount": "._admission",
    "ClientInfo": "._admission",
    "ClientRefused": "._admission",
    "ConnectionPolicy": "._admission",
    "certificate_subject": "._admission",
    "takes_client": "._admission",
    "ClientResolver": "._servercore",
    "ServerConnection": "._server",
    "DeviceCapabilities": "._export",
    "capabilities_of": "._export",
    "ExportSpec": "._export",
    "export_for": "._export",
    "answer_export_request": "._export",
    "BlockDevice": "._device",
    "Buffer": "._device",
    "Dispatch": "._device",
    "dispatch_of": "._device",
    "DeviceCall": "._dispatch",
    "ReadView": "._dispatch",
    "WriteView": "._dispatch",
    "OnError": "._dispatch",
    "RequestBudget": "._budget",
    "MemoryBudget": "._budget",
    "BudgetShare": "._budget",
    "MemoryShare": "._budget",
    "DEFAULT_MEMORY_LIMIT": "._budget",
    "request_cost": "._budget",
    "ConnectionLog": "._serverlog",
    "RECV_SIZE": "._receivesize",
    "STREAM_RECV_SIZE": "._receivesize",
    "ReceiveSize": "._receivesize",
    "ServerLimits": "._limits",
    "DEFAULT_LIMITS": "._limits",
    "FLUSH_AT": "._serving",
    "RECEIVE": "._serving",
    "RECEIVE_READY": "._serving",
    "READY_IN_A_ROW": "._serving",
    "STREAM_WRITES_OVER": "._serving",
    "BatchEnd": "._serving",
    "ACCEPT_HOLD_BACK": "._servercore",
    "Exports": "._servercore",
    "ServerCore": "._servercore",
    "ServerOptions": "._servercore",
    "SessionSettings": "._servercore",
    "Stoppable": "._servercore",
    "current_connection": "._servercore",
    "enter_connection": "._servercore",
    "Resolver": "._servercore",
    "ServerSessionLogic": "._serving",
    "Work": "._serving",
    "carry_out": "._dispatch",
    "carry_out_all": "._dispatch",
    "device_calls": "._dispatch",
    "error_reply_for": "._dispatch",
    "nbd_errno": "._dispatch",
    "read_view_of": "._dispatch",
    "reply_for": "._dispatch",
    "write_view_of": "._dispatch",
}

__all__ = [
    *_constants_all,
    *_errors_all,
    *_events_all,
    "NEED_DATA",
    "PAUSED",
    "Phase",
    "HandshakeStep",
    "ClientSessionLogic",
    "ClientRequests",
    "ConnectOptions",
    "Blocking",
    "Awaiting",
    "TlsMode",
    "ServerConnection",
    "ClientConnection",
    "ClientNegotiation",
    "NegotiationError",
    "ExportDetails",
    "Inquiry",
    "plan_connection",
    "DeviceCapabilities",
    "capabilities_of",
    "ExportSpec",
    "export_for",
    "answer_export_request",
    "BlockDevice",
    "Buffer",
    "Dispatch",
    "dispatch_of",
    "DeviceCall",
    "ReadView",
    "WriteView",
    "OnError",
    "RequestBudget",
    "MemoryBudget",
    "BudgetShare",
    "MemoryShare",
    "DEFAULT_MEMORY_LIMIT",
    "request_cost",
    "ConnectionLog",
    "RECV_SIZE",
    "STREAM_RECV_SIZE",
    "ReceiveSize",
    "ServerLimits",
    "DEFAULT_LIMITS",
    "FLUSH_AT",
    "RECEIVE",
    "RECEIVE_READY",
    "READY_IN_A_ROW",
    "STREAM_WRITES_OVER",
    "BatchEnd",
    "Exports",
    "ServerCore",
    "ACCEPT_HOLD_BACK",
    "ServerOptions",
    "SessionSettings",
    "Stoppable",
    "current_connection",
    "enter_connection",
    "Resolver",
    "ClientResolver",
    "ClientCount",
    "ClientInfo",
    "ClientRefused",
    "ConnectionPolicy",
    "certificate_subject",
    "takes_client",
    "ServerSessionLogic",
    "Work",
    "carry_out",
    "carry_out_all",
    "device_calls",
    "error_reply_for",
    "nbd_errno",
    "read_view_of",
    "reply_for",
    "write_view_of",
    "step_past",
    "lazy_names",
    "NbdUri",
    "parse_uri",
    "connect_error",
    "looks_like_uri",
    "format_uri",
]
__version__ = "0.1.0"


if not TYPE_CHECKING:  # type checkers see the imports above; a __getattr__ would hide misspelt names
    __getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
