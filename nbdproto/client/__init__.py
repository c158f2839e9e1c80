"""nbdproto.client: what an NBD client does with the engine, without I/O, shared by both client backends.

- ``_uri``: NBD URIs (parse them into what a client needs to connect, and format them).
- ``_negotiation``: the usual handshake as a plan (TLS first when asked, extended headers or structured
  replies, meta contexts, GO with block sizes, EXPORT_NAME for old servers), and opt-mode inquiries.
- ``_dirty``: a dirty bitmap's block status joined with base:allocation's (what an incremental backup copies).
- ``_session``: one client connection's logic (``ClientSessionLogic``) and every request method, written once
  for the blocking and the async client (``ClientRequests``).
"""

from __future__ import annotations

from ._dirty import DIRTY_BITMAP_PREFIX, DirtyExtent, dirty_extents
from ._negotiation import ClientNegotiation, ExportDetails, Inquiry, NegotiationError, plan_connection
from ._session import Awaiting, Blocking, ClientRequests, ClientSessionLogic, ConnectOptions
from ._uri import NbdUri, connect_error, format_uri, looks_like_uri, parse_uri

__all__ = [
    "NbdUri",
    "parse_uri",
    "format_uri",
    "connect_error",
    "looks_like_uri",
    "ClientNegotiation",
    "NegotiationError",
    "ExportDetails",
    "Inquiry",
    "plan_connection",
    "ClientSessionLogic",
    "ClientRequests",
    "ConnectOptions",
    "Blocking",
    "Awaiting",
    "DirtyExtent",
    "dirty_extents",
    "DIRTY_BITMAP_PREFIX",
]
