"""nbdproto: the Network Block Device protocol as a sans-IO engine (bytes in, events out; events in, bytes out).

Everything public is re-exported here; the modules behind it are private and each has one job. The server's
names are loaded on first use (PEP 562): a client's start-up (``nbdproto copy``) should not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._client import ClientConnection
from ._constants import *  # noqa: F403
from ._constants import __all__ as _constants_all
from ._errors import *  # noqa: F403
from ._errors import __all__ as _errors_all
from ._events import *  # noqa: F403
from ._events import __all__ as _events_all
from ._lazy import lazy_names
from ._negotiation import ClientNegotiation, NegotiationError
from ._state import NEED_DATA, PAUSED, Phase, TlsMode
from ._uri import NbdUri, format_uri, parse_uri

if TYPE_CHECKING:
    from ._export import DeviceCapabilities, ExportSpec, export_for
    from ._server import ServerConnection

_LAZY = {
    "ServerConnection": "._server",
    "DeviceCapabilities": "._export",
    "ExportSpec": "._export",
    "export_for": "._export",
}

__all__ = [
    *_constants_all,
    *_errors_all,
    *_events_all,
    "NEED_DATA",
    "PAUSED",
    "Phase",
    "TlsMode",
    "ServerConnection",
    "ClientConnection",
    "ClientNegotiation",
    "NegotiationError",
    "DeviceCapabilities",
    "ExportSpec",
    "export_for",
    "NbdUri",
    "parse_uri",
    "format_uri",
]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
