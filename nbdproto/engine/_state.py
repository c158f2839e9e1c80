"""The phases of an NBD connection and the TLS modes, shared by both roles.

Everything that decides *when* a message is allowed lives in the connection classes as checks against these
phases; this module names the phases and the TLS policy so that both roles speak of them the same way.

The phases (spec: "Protocol phases"):

    GREETING      server: greeting sent, waiting for the client flags
                  client: waiting for the server's greeting
    OPTIONS       fixed newstyle option haggling, one option at a time
    AWAIT_EXPORT  server only: an ExportRequested event is out; the application must answer it
    TLS_UPGRADE   STARTTLS was accepted; nothing moves until the driver calls tls_established()
    TRANSMISSION  requests and replies
    CLOSED        the connection ended as the protocol allows (DISC, ABORT, or the peer closed)
    ERROR         a protocol error ended the connection (a ProtocolError was raised)
"""

from __future__ import annotations

import enum

__all__ = ["Phase", "TlsMode", "HandshakeStep", "Sentinel", "NEED_DATA", "PAUSED"]


class Phase(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    AWAIT_EXPORT = "await-export"
    TLS_UPGRADE = "tls-upgrade"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class TlsMode(enum.Enum):
    """A server's TLS mode (spec: "Server-side requirements").

    NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY. FORCEDTLS: every option but STARTTLS and ABORT gets
    NBD_REP_ERR_TLS_REQD until TLS is up (EXPORT_NAME closes). SELECTIVETLS: TLS is optional, and exports marked
    ``tls_required`` refuse INFO/GO with NBD_REP_ERR_TLS_REQD (EXPORT_NAME closes) until TLS is up.
    """

    NOTLS = "notls"
    FORCEDTLS = "forcedtls"
    SELECTIVETLS = "selectivetls"


class HandshakeStep(enum.Enum):
    """What a driver must do for a handshake to go on (the session logic of either role says, step by step)."""

    EXCHANGE = "send what is queued, then receive"
    START_TLS = "send what is queued, run the TLS handshake, then tell the session logic it is established"
    DONE = "the handshake is over"


class Sentinel(type):
    """Metaclass of the sentinel values: a class that is its own type, printed by name (as in h11)."""

    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=Sentinel):
    """Returned by ``next_event()`` when the buffered bytes hold no complete message."""


class PAUSED(metaclass=Sentinel):
    """Returned by ``next_event()`` while the connection waits on its driver (an export lookup to answer, a
    TLS upgrade to finish) or has ended."""
