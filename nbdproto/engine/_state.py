"""The phases of an NBD connection, and every transition between them, for both roles: everything that decides
*when* something may happen lives here, as tables the connection classes consult.

This module knows the phases, what moves a connection from one to another (a ``Trigger``), and which events
each role may send in each phase. It does not know how bytes are parsed or built: the connection classes
recognise that a trigger happened (the client flags arrived, STARTTLS was acknowledged) and ask the table where
that leads with ``next_phase``, which refuses a trigger the phase does not allow. The model is h11's
_state.py: the rules readable as tables, tested by walking every phase and every trigger of each table.

The phases (spec: "Protocol phases"):

    GREETING      server: greeting sent, waiting for the client flags
                  client: waiting for the server's greeting
    OPTIONS       fixed newstyle option haggling, one option at a time
    AWAIT_EXPORT  server only: an ExportRequested event is out; the application must answer it
    TLS_UPGRADE   STARTTLS was accepted; nothing moves until the driver calls tls_established()
    TRANSMISSION  requests and replies
    CLOSED        the connection ended as the protocol allows (DISC, ABORT, or the peer closed)
    ERROR         a protocol error ended the connection (a ProtocolError was raised)

Both roles go GREETING -> OPTIONS (-> TLS_UPGRADE -> OPTIONS) -> TRANSMISSION -> CLOSED. Where they differ:
the server stops in AWAIT_EXPORT while its application looks an export up, and can only close when EXPORT_NAME
names an export it refuses (that option has no error reply); the client may meet an oldstyle server, whose
greeting leads straight to transmission. A protocol error, ours or the peer's, leads to ERROR from any phase
but ERROR itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import get_args

from nbdproto.wire import LocalProtocolError

from ._events import Event
from ._handshake_events import (
    Export,
    ExportUnknown,
    OptionAbort,
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
)
from ._transmission_events import (
    BlockStatusReply,
    ErrorReply,
    ReadData,
    ReadHole,
    Request,
    SuccessReply,
)

__all__ = [
    "Phase",
    "Trigger",
    "Role",
    "TRANSITIONS",
    "SENDS",
    "next_phase",
    "TlsMode",
    "HandshakeStep",
    "Sentinel",
    "NEED_DATA",
    "PAUSED",
]


class Phase(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    AWAIT_EXPORT = "await-export"
    TLS_UPGRADE = "tls-upgrade"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class Trigger(enum.Enum):
    """What moves a connection from one phase to another."""

    GREETED = "the greeting and the client flags were exchanged"
    OLDSTYLE_GREETING = "an oldstyle greeting (size and flags, no options) was received"
    EXPORT_REQUESTED = "an option about an export was handed to the application (ExportRequested)"
    EXPORT_ANSWERED = "the application answered the option about an export; options go on"
    EXPORT_CHOSEN = "the client's choice of export was accepted (NBD_OPT_GO, NBD_OPT_EXPORT_NAME)"
    EXPORT_NAME_REFUSED = "NBD_OPT_EXPORT_NAME named an export the server refuses (it has no error reply)"
    STARTTLS_ACCEPTED = "NBD_OPT_STARTTLS was acknowledged"
    TLS_ESTABLISHED = "the driver finished the TLS handshake"
    ABORTED = "NBD_OPT_ABORT ended the handshake"
    DISCONNECTED = "NBD_CMD_DISC was received and every reply owed was sent"
    PEER_CLOSED = "the peer closed the stream where the protocol allows it"
    BROKEN = "a protocol rule was broken, by the peer (RemoteProtocolError) or our side (LocalProtocolError)"


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


_T, _P = Trigger, Phase


def _breakable(table: dict[Phase, dict[Trigger, Phase]]) -> Mapping[Phase, Mapping[Trigger, Phase]]:
    """``table`` with BROKEN -> ERROR added to every phase but ERROR."""
    return {
        phase: moves if phase is Phase.ERROR else {**moves, Trigger.BROKEN: Phase.ERROR}
        for phase, moves in table.items()
    }


TRANSITIONS: Mapping[Role, Mapping[Phase, Mapping[Trigger, Phase]]] = {
    Role.SERVER: _breakable(
        {
            _P.GREETING: {_T.GREETED: _P.OPTIONS, _T.PEER_CLOSED: _P.CLOSED},
            _P.OPTIONS: {
                _T.EXPORT_REQUESTED: _P.AWAIT_EXPORT,
                _T.STARTTLS_ACCEPTED: _P.TLS_UPGRADE,
                _T.ABORTED: _P.CLOSED,
                _T.PEER_CLOSED: _P.CLOSED,
            },
            _P.AWAIT_EXPORT: {
                _T.EXPORT_ANSWERED: _P.OPTIONS,
                _T.EXPORT_CHOSEN: _P.TRANSMISSION,
                _T.EXPORT_NAME_REFUSED: _P.CLOSED,
            },
            _P.TLS_UPGRADE: {_T.TLS_ESTABLISHED: _P.OPTIONS},
            _P.TRANSMISSION: {_T.DISCONNECTED: _P.CLOSED, _T.PEER_CLOSED: _P.CLOSED},
            _P.CLOSED: {},
            _P.ERROR: {},
        }
    ),
    Role.CLIENT: _breakable(
        {
            _P.GREETING: {_T.GREETED: _P.OPTIONS, _T.OLDSTYLE_GREETING: _P.TRANSMISSION},
            _P.OPTIONS: {
                _T.STARTTLS_ACCEPTED: _P.TLS_UPGRADE,
                _T.EXPORT_CHOSEN: _P.TRANSMISSION,
                _T.ABORTED: _P.CLOSED,
                _T.PEER_CLOSED: _P.CLOSED,
            },
            _P.TLS_UPGRADE: {_T.TLS_ESTABLISHED: _P.OPTIONS},
            _P.TRANSMISSION: {_T.PEER_CLOSED: _P.CLOSED},
            _P.CLOSED: {},
            _P.ERROR: {},
        }
    ),
}
"""Each role's transitions: phase -> trigger -> the next phase. A trigger a phase does not list cannot happen
there (``next_phase`` refuses it); every phase but ERROR also goes to ERROR when a rule is broken (BROKEN). A
client never enters AWAIT_EXPORT: its table has no such phase."""

_OPTIONS: frozenset[type[Event]] = frozenset(
    {
        OptionExportName,
        OptionAbort,
        OptionList,
        OptionStartTLS,
        OptionInfo,
        OptionGo,
        OptionStructuredReply,
        OptionListMetaContext,
        OptionSetMetaContext,
        OptionExtendedHeaders,
        OptionRaw,
    }
)
_REQUESTS: frozenset[type[Event]] = frozenset(get_args(Request))
_REPLIES: frozenset[type[Event]] = frozenset({ReadData, ReadHole, BlockStatusReply, SuccessReply, ErrorReply})

SENDS: Mapping[Role, Mapping[Phase, frozenset[type[Event]]]] = {
    Role.SERVER: {
        Phase.AWAIT_EXPORT: frozenset({Export, ExportUnknown}),
        Phase.TRANSMISSION: _REPLIES,
        Phase.CLOSED: _REPLIES,  # late replies to a client that is gone: taken, and dropped
    },
    Role.CLIENT: {Phase.OPTIONS: _OPTIONS, Phase.TRANSMISSION: _REQUESTS},
}
"""The events each role's application may send in each phase (``send``); anything else is a LocalProtocolError.
Whether an allowed event fits the moment (an answer to the request it names, an option while none is waiting)
is the connection's check."""


def next_phase(role: Role, phase: Phase, trigger: Trigger) -> Phase:
    """Where ``trigger`` leads ``role`` from ``phase``; LocalProtocolError if the table does not allow it."""
    following = TRANSITIONS[role].get(phase, {}).get(trigger)
    if following is None:
        raise LocalProtocolError(f"the {role.value} cannot go on from phase {phase.value}: {trigger.value}")
    return following


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
