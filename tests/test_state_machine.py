"""The transition tables of nbdproto.engine._state, walked exhaustively against the real connections.

For each role: every phase is reached by driving a real connection there; from each, every event class is
sent (the table's SENDS says which are allowed: those go through, the rest are refused and end the
connection, but for a client's refused request in transmission, which leaves it as it was); every trigger the
table lists is caused for real (bytes from the peer, an answer of the application, a call of the driver) and
must land where the table says; and every trigger it does not list is refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

import nbdproto.engine as e
from nbdproto.engine._state import SENDS, TRANSITIONS, Phase, Role, Trigger, next_phase
from nbdproto.wire import (
    BASE_ALLOCATION,
    ClientFlags,
    Command,
    Errno,
    HandshakeFlags,
    LocalProtocolError,
    Magic,
    Option,
    ProtocolError,
    RemoteProtocolError,
    TransmissionFlags,
)
from tests import nbdbytes as b

_F = TransmissionFlags
_ALL_FLAGS = (
    _F.SEND_FLUSH | _F.SEND_FUA | _F.SEND_TRIM | _F.SEND_CACHE | _F.SEND_WRITE_ZEROES | _F.SEND_RESIZE | _F.HAS_FLAGS
)
_Conn = e.ServerConnection | e.ClientConnection
_EXPORT = e.Export("a", 1 << 20, _ALL_FLAGS, meta_contexts=(BASE_ALLOCATION,))
_EVENT_CLASSES = sorted(
    {cls for name in e.__all__ if isinstance(cls := getattr(e, name), type) and issubclass(cls, e.Event)} - {e.Event},
    key=lambda cls: cls.__name__,
)


def _drain(conn: e.ServerConnection | e.ClientConnection) -> list[e.Event]:
    events = []
    while (event := conn.next_event()) not in (e.NEED_DATA, e.PAUSED):
        events.append(event)  # type: ignore[arg-type]
        if isinstance(event, e.ConnectionClosed):
            break
    return events


# --- The server, driven by a client's raw bytes --------------------------------------------------------------


def _server(*options: bytes, answer: bool = True) -> e.ServerConnection:
    """A server fed the client flags and ``options``; each ExportRequested answered with _EXPORT (``answer``)."""
    server = e.ServerConnection(exports=["a"], tls=e.TlsMode.SELECTIVETLS)
    server.data_to_send()
    server.receive_data(b.client_flags())
    _drain(server)
    for option in options:
        server.receive_data(option)
        for event in _drain(server):
            if isinstance(event, e.ExportRequested) and answer:
                server.send(_EXPORT)
                _drain(server)
    server.data_to_send()
    return server


_GO = b.option(Option.GO, b.info_payload("a"))
_STRUCTURED = b.option(Option.STRUCTURED_REPLY)
_SET_CONTEXT = b.option(Option.SET_META_CONTEXT, b.meta_payload("a", BASE_ALLOCATION))


def _server_transmitting(in_flight: bool = True) -> e.ServerConnection:
    """A server in transmission with structured replies and base:allocation; with ``in_flight``, a read
    (cookie 1), a write (2) and a block status (3) wait for their replies."""
    server = _server(_STRUCTURED, _SET_CONTEXT, _GO)
    assert server.phase is Phase.TRANSMISSION
    if in_flight:
        server.receive_data(b.request(Command.READ, 1, 0, 512))
        server.receive_data(b.request(Command.WRITE, 2, 0, 512) + bytes(512))
        server.receive_data(b.request(Command.BLOCK_STATUS, 3, 0, 4096))
        assert len(_drain(server)) == 3
    return server


def _server_in(phase: Phase) -> e.ServerConnection:
    if phase is Phase.GREETING:
        server = e.ServerConnection(exports=["a"], tls=e.TlsMode.SELECTIVETLS)
        server.data_to_send()
        return server
    if phase is Phase.OPTIONS:
        return _server()
    if phase is Phase.AWAIT_EXPORT:
        return _server(_GO, answer=False)
    if phase is Phase.TLS_UPGRADE:
        return _server(b.option(Option.STARTTLS))
    if phase is Phase.TRANSMISSION:
        return _server_transmitting()
    if phase is Phase.CLOSED:
        return _server(b.option(Option.ABORT))
    server = _server()
    with pytest.raises(RemoteProtocolError):
        _garbage_request(server)
    return server


_SERVER_SAMPLES: dict[type, e.Event] = {
    e.ReadData: e.ReadData(1, 0, bytes(512)),
    e.ReadHole: e.ReadHole(1, 0, 512),
    e.SuccessReply: e.SuccessReply(2),
    e.ErrorReply: e.ErrorReply(2, Errno.EIO, "no"),
    e.BlockStatusReply: e.BlockStatusReply(3, {1: [e.Extent(4096, 0)]}),
    e.Export: _EXPORT,
    e.ExportUnknown: e.ExportUnknown("no such export"),
}


# --- The client, driven by a real server ---------------------------------------------------------------------


def _pump(client: e.ClientConnection, server: e.ServerConnection) -> list[e.Event]:
    """Move bytes both ways until neither side has more; the server answers every export question."""
    events: list[e.Event] = []
    while True:
        moved = False
        for piece in client.data_to_send():
            server.receive_data(piece)
            moved = True
        for event in _drain(server):
            if isinstance(event, e.ExportRequested):
                server.send(_EXPORT)
        for piece in server.data_to_send():
            client.receive_data(bytes(piece))
            moved = True
        events += _drain(client)
        if not moved:
            return events


def _client(*options: e.Event) -> tuple[e.ClientConnection, e.ServerConnection]:
    """A client past the greeting that negotiated structured replies, then sent ``options`` one at a time."""
    client, server = e.ClientConnection(), e.ServerConnection(exports=["a"], tls=e.TlsMode.SELECTIVETLS)
    _pump(client, server)
    for option in (e.OptionStructuredReply(), *options):
        client.send(option)
        _pump(client, server)
    return client, server


def _client_in(phase: Phase) -> e.ClientConnection:
    if phase is Phase.GREETING:
        return e.ClientConnection()
    if phase is Phase.OPTIONS:
        return _client()[0]
    if phase is Phase.TLS_UPGRADE:
        return _client(e.OptionStartTLS())[0]
    if phase is Phase.TRANSMISSION:
        return _client(e.OptionSetMetaContext("a", (BASE_ALLOCATION,)), e.OptionGo("a"))[0]
    if phase is Phase.CLOSED:
        return _client(e.OptionAbort())[0]
    assert phase is Phase.ERROR
    client = e.ClientConnection()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"\xff" * 18)
        _drain(client)
    return client


_CLIENT_SAMPLES: dict[type, e.Event] = {
    e.OptionExportName: e.OptionExportName("a"),
    e.OptionAbort: e.OptionAbort(),
    e.OptionList: e.OptionList(),
    e.OptionStartTLS: e.OptionStartTLS(),
    e.OptionInfo: e.OptionInfo("a"),
    e.OptionGo: e.OptionGo("a"),
    e.OptionStructuredReply: e.OptionStructuredReply(),
    e.OptionListMetaContext: e.OptionListMetaContext("a", ("base:",)),
    e.OptionSetMetaContext: e.OptionSetMetaContext("a", (BASE_ALLOCATION,)),
    e.OptionExtendedHeaders: e.OptionExtendedHeaders(),
    e.OptionRaw: e.OptionRaw(99, b""),
    e.ReadRequest: e.ReadRequest(1, 0, 512),
    e.WriteRequest: e.WriteRequest(1, 0, bytes(512)),
    e.DisconnectRequest: e.DisconnectRequest(),
    e.FlushRequest: e.FlushRequest(1),
    e.TrimRequest: e.TrimRequest(1, 0, 512),
    e.CacheRequest: e.CacheRequest(1, 0, 512),
    e.WriteZeroesRequest: e.WriteZeroesRequest(1, 0, 512),
    e.BlockStatusRequest: e.BlockStatusRequest(1, 0, 512),
    e.ResizeRequest: e.ResizeRequest(1, 1 << 21),
}

_REACH: dict[Role, Callable[[Phase], e.ServerConnection | e.ClientConnection]] = {
    Role.SERVER: _server_in,
    Role.CLIENT: _client_in,
}


def _sample(role: Role, cls: type) -> e.Event:
    """An instance of ``cls`` that fits the state ``_REACH`` builds (or any, for a class never allowed)."""
    known = _SERVER_SAMPLES if role is Role.SERVER else _CLIENT_SAMPLES
    if cls in known:
        return known[cls]
    other = _CLIENT_SAMPLES if role is Role.SERVER else _SERVER_SAMPLES
    if cls in other:
        return other[cls]
    return _ANY.get(cls) or cls.__new__(cls)


_ANY: dict[type, e.Event] = {
    e.ServerGreeting: e.ServerGreeting(3),
    e.ExportRequested: e.ExportRequested("a", Option.GO),
    e.ConnectionClosed: e.ConnectionClosed(),
}

_PHASES = {role: [phase for phase in Phase if phase in TRANSITIONS[role]] for role in Role}


def test_the_samples_cover_every_event_the_tables_allow() -> None:
    for role in Role:
        allowed = set().union(*SENDS[role].values())
        known = _SERVER_SAMPLES if role is Role.SERVER else _CLIENT_SAMPLES
        assert allowed <= set(known), role


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_every_phase_is_reached_for_real(role: Role) -> None:
    for phase in _PHASES[role]:
        assert _REACH[role](phase).phase is phase


@pytest.mark.parametrize(
    ("role", "phase"), [(role, phase) for role in Role for phase in _PHASES[role]], ids=lambda v: v.value
)
def test_every_event_is_sent_in_every_phase_as_the_table_says(role: Role, phase: Phase) -> None:
    allowed = SENDS[role].get(phase, frozenset())
    for cls in _EVENT_CLASSES:
        conn = _REACH[role](phase)
        event = _sample(role, cls)
        if cls in allowed:
            conn.send(event)  # a fitting event goes through, and the phase is still where it was (or, for a
            # server's answer to an export question, where the answer leads)
            assert conn.phase is not Phase.ERROR, (role, phase, cls)
            continue
        with pytest.raises(LocalProtocolError):
            conn.send(event)
        if role is Role.CLIENT and phase is Phase.TRANSMISSION:
            assert conn.phase is Phase.TRANSMISSION, cls  # a refused request is simply not sent
        else:
            assert conn.phase is Phase.ERROR, (role, phase, cls)


# --- Every transition, caused for real -----------------------------------------------------------------------


def _garbage_request(conn: e.ServerConnection | e.ClientConnection) -> None:
    conn.receive_data(b"\xff" * 32)
    _drain(conn)


def _server_export_answer(option: bytes, answer: e.Event) -> Callable[[], e.ServerConnection]:
    def act() -> e.ServerConnection:
        server = _server(option, answer=False)
        assert server.phase is Phase.AWAIT_EXPORT
        server.send(answer)
        return server

    return act


def _act(conn: _Conn, action: Callable[[_Conn], object], breaks: bool) -> _Conn:
    """Run ``action`` on ``conn``: one that breaks a rule must raise a ProtocolError, any other must not."""
    if breaks:
        with pytest.raises(ProtocolError):
            action(conn)
    else:
        action(conn)
    return conn


def _server_from(phase: Phase, action: Callable[[Any], object], breaks: bool = False) -> Callable[[], _Conn]:
    def act() -> _Conn:
        server = _server_in(phase) if phase is not Phase.TRANSMISSION else _server_transmitting(in_flight=False)
        return _act(server, action, breaks)

    return act


def _client_from(phase: Phase, action: Callable[[Any], object], breaks: bool = False) -> Callable[[], _Conn]:
    return lambda: _act(_client_in(phase), action, breaks)


def _feed(data: bytes) -> Callable[[e.ServerConnection | e.ClientConnection], object]:
    def action(conn: e.ServerConnection | e.ClientConnection) -> object:
        conn.receive_data(data)
        return _drain(conn)

    return action


def _client_option(option: e.Event) -> Callable[[], e.ClientConnection]:
    def act() -> e.ClientConnection:
        client, server = _client()
        client.send(option)
        _pump(client, server)
        return client

    return act


_P, _T = Phase, Trigger
_OLDSTYLE = struct.pack(">QQQI", Magic.NBDMAGIC, Magic.CLISERV_MAGIC, 1 << 20, 1) + bytes(124)
_NEWSTYLE = struct.pack(">QQH", Magic.NBDMAGIC, Magic.IHAVEOPT, HandshakeFlags.FIXED_NEWSTYLE)

_ACTIONS: dict[tuple[Role, Phase, Trigger], Callable[[], e.ServerConnection | e.ClientConnection]] = {
    (Role.SERVER, _P.GREETING, _T.GREETED): _server_from(_P.GREETING, _feed(b.client_flags())),
    (Role.SERVER, _P.GREETING, _T.PEER_CLOSED): _server_from(_P.GREETING, _feed(b"")),
    (Role.SERVER, _P.GREETING, _T.BROKEN): _server_from(_P.GREETING, _feed(struct.pack(">I", 1 << 20)), breaks=True),
    (Role.SERVER, _P.OPTIONS, _T.EXPORT_REQUESTED): _server_from(_P.OPTIONS, _feed(_GO)),
    (Role.SERVER, _P.OPTIONS, _T.STARTTLS_ACCEPTED): _server_from(_P.OPTIONS, _feed(b.option(Option.STARTTLS))),
    (Role.SERVER, _P.OPTIONS, _T.ABORTED): _server_from(_P.OPTIONS, _feed(b.option(Option.ABORT))),
    (Role.SERVER, _P.OPTIONS, _T.PEER_CLOSED): _server_from(_P.OPTIONS, _feed(b"")),
    (Role.SERVER, _P.OPTIONS, _T.BROKEN): _server_from(_P.OPTIONS, _garbage_request, breaks=True),
    (Role.SERVER, _P.AWAIT_EXPORT, _T.EXPORT_ANSWERED): _server_export_answer(
        b.option(Option.INFO, b.info_payload("a")), _EXPORT
    ),
    (Role.SERVER, _P.AWAIT_EXPORT, _T.EXPORT_CHOSEN): _server_export_answer(_GO, _EXPORT),
    (Role.SERVER, _P.AWAIT_EXPORT, _T.EXPORT_NAME_REFUSED): _server_export_answer(
        b.option(Option.EXPORT_NAME, b"a"), e.ExportUnknown("no")
    ),
    (Role.SERVER, _P.AWAIT_EXPORT, _T.BROKEN): _server_from(
        _P.AWAIT_EXPORT, lambda s: s.send(e.SuccessReply(1)), breaks=True
    ),
    (Role.SERVER, _P.TLS_UPGRADE, _T.TLS_ESTABLISHED): _server_from(_P.TLS_UPGRADE, lambda s: s.tls_established()),
    (Role.SERVER, _P.TLS_UPGRADE, _T.BROKEN): _server_from(_P.TLS_UPGRADE, _feed(b.option(Option.LIST)), breaks=True),
    (Role.SERVER, _P.TRANSMISSION, _T.DISCONNECTED): _server_from(_P.TRANSMISSION, _feed(b.request(Command.DISC, 9))),
    (Role.SERVER, _P.TRANSMISSION, _T.PEER_CLOSED): _server_from(_P.TRANSMISSION, _feed(b"")),
    (Role.SERVER, _P.TRANSMISSION, _T.BROKEN): _server_from(_P.TRANSMISSION, _garbage_request, breaks=True),
    (Role.SERVER, _P.CLOSED, _T.BROKEN): _server_from(_P.CLOSED, lambda s: s.send(_EXPORT), breaks=True),
    (Role.CLIENT, _P.GREETING, _T.GREETED): _client_from(_P.GREETING, _feed(_NEWSTYLE)),
    (Role.CLIENT, _P.GREETING, _T.OLDSTYLE_GREETING): _client_from(_P.GREETING, _feed(_OLDSTYLE)),
    (Role.CLIENT, _P.GREETING, _T.BROKEN): _client_from(_P.GREETING, _feed(b"\xff" * 18), breaks=True),
    (Role.CLIENT, _P.OPTIONS, _T.STARTTLS_ACCEPTED): _client_option(e.OptionStartTLS()),
    (Role.CLIENT, _P.OPTIONS, _T.EXPORT_CHOSEN): _client_option(e.OptionGo("a")),
    (Role.CLIENT, _P.OPTIONS, _T.ABORTED): _client_option(e.OptionAbort()),
    (Role.CLIENT, _P.OPTIONS, _T.PEER_CLOSED): _client_from(_P.OPTIONS, _feed(b"")),
    (Role.CLIENT, _P.OPTIONS, _T.BROKEN): _client_from(_P.OPTIONS, _feed(b"unasked for"), breaks=True),
    (Role.CLIENT, _P.TLS_UPGRADE, _T.TLS_ESTABLISHED): _client_from(_P.TLS_UPGRADE, lambda c: c.tls_established()),
    (Role.CLIENT, _P.TLS_UPGRADE, _T.BROKEN): _client_from(_P.TLS_UPGRADE, _feed(b"plaintext"), breaks=True),
    (Role.CLIENT, _P.TRANSMISSION, _T.PEER_CLOSED): _client_from(_P.TRANSMISSION, _feed(b"")),
    (Role.CLIENT, _P.TRANSMISSION, _T.BROKEN): _client_from(_P.TRANSMISSION, _garbage_request, breaks=True),
    (Role.CLIENT, _P.CLOSED, _T.BROKEN): _client_from(_P.CLOSED, lambda c: c.send(e.OptionList()), breaks=True),
}


def test_every_transition_of_the_tables_has_an_action() -> None:
    listed = {
        (role, phase, trigger) for role in Role for phase, moves in TRANSITIONS[role].items() for trigger in moves
    }
    assert listed == set(_ACTIONS)


@pytest.mark.parametrize("key", list(_ACTIONS), ids=lambda k: f"{k[0].value}-{k[1].value}-{k[2].name}")
def test_every_transition_lands_where_the_table_says(key: tuple[Role, Phase, Trigger]) -> None:
    role, phase, trigger = key
    assert _ACTIONS[key]().phase is TRANSITIONS[role][phase][trigger]


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_every_trigger_a_phase_does_not_list_is_refused(role: Role) -> None:
    for phase in Phase:
        for trigger in Trigger:
            if trigger in TRANSITIONS[role].get(phase, {}):
                continue
            with pytest.raises(LocalProtocolError):
                next_phase(role, phase, trigger)


@pytest.mark.parametrize(
    ("role", "phase"), [(role, phase) for role in Role for phase in _PHASES[role]], ids=lambda v: v.value
)
def test_the_driver_calls_follow_the_tables(role: Role, phase: Phase) -> None:
    # tls_established() is the driver's trigger: allowed only where the table lists TLS_ESTABLISHED.
    conn = _REACH[role](phase)
    if Trigger.TLS_ESTABLISHED in TRANSITIONS[role][phase]:
        conn.tls_established()
        assert conn.phase is TRANSITIONS[role][phase][Trigger.TLS_ESTABLISHED]
    else:
        with pytest.raises(LocalProtocolError):
            conn.tls_established()
        assert conn.phase is phase


def test_the_transmission_fast_paths_agree_with_the_table() -> None:
    # The server takes a one-chunk ReadData before consulting SENDS: only where SENDS allows it.
    assert e.ReadData in SENDS[Role.SERVER][Phase.TRANSMISSION]
    server = _server_in(Phase.AWAIT_EXPORT)
    with pytest.raises(LocalProtocolError):
        server.send(e.ReadData(1, 0, bytes(512)))
    assert server.phase is Phase.ERROR


def test_client_flags_unknown_to_the_server_are_a_broken_greeting() -> None:
    server = _server_in(Phase.GREETING)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b.client_flags(ClientFlags.FIXED_NEWSTYLE | 1 << 7))
        _drain(server)
    assert server.phase is Phase.ERROR


def test_a_late_reply_to_a_client_that_is_gone_is_taken_and_dropped() -> None:
    # A device call that finishes after the client closed still answers: the engine takes it quietly
    # (SENDS allows replies in CLOSED) and queues nothing, so a backend need not race the close.
    server = _server_transmitting()
    server.receive_data(b"")
    assert isinstance(server.next_event(), e.ConnectionClosed)
    server.send(e.ReadData(1, 0, bytes(512)))
    assert server.phase is Phase.CLOSED and server.data_to_send() == []


# --- The words errors use ----------------------------------------------------------------------------------
# Phases, roles and triggers are named in LocalProtocolError's words ("cannot send ReadData in phase options",
# "the server cannot go on from phase closed: NBD_OPT_STARTTLS was acknowledged"); Phase and TlsMode are public
# and their values are what users see printed. Stated here as the documentation states them.

PHASE_WORDS = {
    Phase.GREETING: "greeting",
    Phase.OPTIONS: "options",
    Phase.AWAIT_EXPORT: "await-export",
    Phase.TLS_UPGRADE: "tls-upgrade",
    Phase.TRANSMISSION: "transmission",
    Phase.CLOSED: "closed",
    Phase.ERROR: "error",
}
ROLE_WORDS = {Role.SERVER: "server", Role.CLIENT: "client"}
TRIGGER_WORDS = {
    Trigger.GREETED: "the greeting and the client flags were exchanged",
    Trigger.OLDSTYLE_GREETING: "an oldstyle greeting (size and flags, no options) was received",
    Trigger.EXPORT_REQUESTED: "an option about an export was handed to the application (ExportRequested)",
    Trigger.EXPORT_ANSWERED: "the application answered the option about an export; options go on",
    Trigger.EXPORT_CHOSEN: "the client's choice of export was accepted (NBD_OPT_GO, NBD_OPT_EXPORT_NAME)",
    Trigger.EXPORT_NAME_REFUSED: "NBD_OPT_EXPORT_NAME named an export the server refuses (it has no error reply)",
    Trigger.STARTTLS_ACCEPTED: "NBD_OPT_STARTTLS was acknowledged",
    Trigger.TLS_ESTABLISHED: "the driver finished the TLS handshake",
    Trigger.ABORTED: "NBD_OPT_ABORT ended the handshake",
    Trigger.DISCONNECTED: "NBD_CMD_DISC was received and every reply owed was sent",
    Trigger.PEER_CLOSED: "the peer closed the stream where the protocol allows it",
    Trigger.BROKEN: "a protocol rule was broken, by the peer (RemoteProtocolError) or our side (LocalProtocolError)",
}


def test_the_words_cover_every_phase_role_and_trigger() -> None:
    assert set(PHASE_WORDS) == set(Phase) and set(ROLE_WORDS) == set(Role) and set(TRIGGER_WORDS) == set(Trigger)
    assert {mode: mode.value for mode in e.TlsMode} == {
        e.TlsMode.NOTLS: "notls", e.TlsMode.FORCEDTLS: "forcedtls", e.TlsMode.SELECTIVETLS: "selectivetls"
    }  # fmt: skip
    assert {phase: phase.value for phase in Phase} == PHASE_WORDS


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_a_refused_trigger_says_who_where_and_what(role: Role) -> None:
    for phase in Phase:
        for trigger in set(Trigger) - set(TRANSITIONS[role].get(phase, {})):
            expected = f"the {ROLE_WORDS[role]} cannot go on from phase {PHASE_WORDS[phase]}: {TRIGGER_WORDS[trigger]}"
            with pytest.raises(LocalProtocolError) as refused:
                next_phase(role, phase, trigger)
            assert str(refused.value) == expected


@pytest.mark.parametrize(
    ("role", "phase"),
    [(role, phase) for role in Role for phase in _PHASES[role] if phase is not Phase.ERROR],
    ids=lambda v: v.value,
)
def test_a_refused_send_names_the_phase(role: Role, phase: Phase) -> None:
    allowed = SENDS[role].get(phase, frozenset())
    cls = next(cls for cls in _EVENT_CLASSES if cls not in allowed and cls.__name__ != "ReadData")
    with pytest.raises(LocalProtocolError) as refused:
        _REACH[role](phase).send(_sample(role, cls))
    if role is Role.CLIENT and phase is Phase.TRANSMISSION:  # a client's own words for what is not a request
        assert str(refused.value) == f"{cls.__name__} cannot be sent in {PHASE_WORDS[phase]}: it is not a request"
    else:
        assert str(refused.value) == f"cannot send {cls.__name__} in phase {PHASE_WORDS[phase]}"
