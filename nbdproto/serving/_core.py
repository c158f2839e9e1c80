"""What a server is apart from its I/O, shared by the threads and anyio servers: the exports it offers, the
settings every session gets, the log, the sessions alive, and the connection policy (who is served).

A backend's ``Server`` is a ``ServerCore`` plus an accept loop and a way to run sessions (threads or tasks):

    client = ClientInfo(...)                          # from the accepted socket (nbdproto.sockets.client_info)
    if not core.admit(client):                        # the policy said no (logged): close, send nothing
        return
    session = ServerSession(connection, core.settings, client=client, ...)
    with core.serving(session, client), session:    # registered, its end logged (whose fault it was)
        session.run(core)                             # negotiate, core.spec_for(...) the choice, serve it

A oneshot server's serving loop ends when its one client has gone: ``serving`` then calls the backend's
``stop_accepting``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from nbdproto.engine import ClientAborted, ExportListing, TlsMode

from ._admission import ClientCount, ClientInfo, ClientRefused, ConnectionPolicy, takes_client
from ._device import BlockDevice
from ._export import ExportSpec
from ._export_table import ExportTable
from ._limits import DEFAULT_LIMITS, ServerLimits
from ._log import ConnectionLog

__all__ = [
    "ACCEPT_HOLD_BACK",
    "Exports",
    "Resolver",
    "ClientResolver",
    "SessionSettings",
    "ServerOptions",
    "ServerCore",
    "Stoppable",
    "current_connection",
    "enter_connection",
]

ACCEPT_HOLD_BACK = 0.002
"""Seconds a server that shares its listening socket with less busy ones waits before taking a pending
connection (see ServerCore.accept_hold_back)."""

current_connection: ContextVar[int] = ContextVar("nbdproto_connection", default=0)
"""The number of the connection served in this context (0: none). Both servers number each connection as it
begins (``ServerCore.serving``), in the thread or task that serves it; worker threads that carry out its
requests run in a copy of that context, so a device or filter (the log filter) can tell connections apart."""

_numbers = itertools.count(1)  # next() on a count is atomic in CPython


def enter_connection() -> int:
    """Give the connection served in the current context the next number (from 1, one count per process), and
    return it; for code that serves connections without a ServerCore."""
    number = next(_numbers)
    current_connection.set(number)
    return number


Resolver = Callable[[str], "ExportSpec[Any] | None"]
"""Looks an export name up: the spec to serve, or None for an unknown name."""

ClientResolver = Callable[[str, ClientInfo], "ExportSpec[Any] | None"]
"""A resolver that is also told who asks: the client's address, and once TLS is up its certificate subject or
pre-shared key identity (nbdproto.ClientInfo). A server calls a resolver so when it cannot be called with the
name alone (``def resolve(name, client)``; see nbdproto.serving.takes_client)."""


class Exports:
    """What a server offers: names mapped to devices or ExportSpecs, or a resolver asked for each name.

    A plain device in the mapping is served read-only (exports are read-only unless they say otherwise); an
    ExportSpec carries its own settings. A mapping is read once; an ``ExportTable`` (exports that come and go
    while the server runs) is read at each lookup and listing. ``offer`` is what NBD_OPT_LIST answers: the
    mapping's names with their descriptions, or None (answered with NBD_REP_ERR_POLICY, the spec's EPERM) for a
    resolver or when ``list_exports`` is False. ``lookup`` is the resolver as given (a ClientResolver is also
    told who asks), or the mapping's ``get``.
    """

    __slots__ = ("lookup", "offer")

    def __init__(
        self,
        exports: Mapping[str, BlockDevice | ExportSpec[Any]] | Resolver | ClientResolver,
        *,
        list_exports: bool = True,
    ) -> None:
        self.lookup: Resolver | ClientResolver
        self.offer: Sequence[ExportListing] | None
        if isinstance(exports, ExportTable):  # looked up and listed as it is when a client asks
            self.lookup = exports.get
            self.offer = exports.offer if list_exports else None
            return
        if callable(exports):
            self.lookup = exports
            self.offer = None
            return
        specs = {name: value if isinstance(value, ExportSpec) else ExportSpec(value) for name, value in exports.items()}
        self.lookup = specs.get
        self.offer = [ExportListing(name, spec.description) for name, spec in specs.items()] if list_exports else None


@dataclass(frozen=True)
class SessionSettings:
    """What a server tells each session.

    ``offer``: names (or ExportListings) answered to NBD_OPT_LIST, None to refuse listing. ``lookup`` answers
    the questions a client asks before choosing (NBD_OPT_INFO, meta contexts); without it INFO is refused and
    meta contexts are offered as base:allocation. ``tls``: the server's ``ssl.SSLContext`` (the engine never
    touches it; the backends wrap the connection with it). ``tls_mode``: the engine's TLS mode; by default TLS is
    forced when there is a context (a server that can speak TLS never serves plaintext unless told to) and off
    without one. ``limits``: time limits and the memory budget. ``policy``: who is served (checked again after
    the TLS upgrade).
    """

    offer: Sequence[str | ExportListing] | None = None
    lookup: Resolver | ClientResolver | None = None
    tls: Any = None
    tls_mode: TlsMode | None = None
    limits: ServerLimits = DEFAULT_LIMITS
    policy: ConnectionPolicy | None = None
    _with_client: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if self.tls_mode is not None and self.tls_mode is not TlsMode.NOTLS and self.tls is None:
            raise ValueError(f"TLS mode {self.tls_mode.value} needs an ssl.SSLContext")
        object.__setattr__(self, "_with_client", self.lookup is not None and takes_client(self.lookup))

    def resolve(self, name: str, client: ClientInfo) -> ExportSpec[Any] | None:
        """The spec ``lookup`` gives for ``name`` asked by ``client`` (None without a lookup)."""
        if self.lookup is None:
            return None
        if self._with_client:
            return self.lookup(name, client)  # type: ignore[call-arg]
        return self.lookup(name)  # type: ignore[call-arg]

    @property
    def effective_tls_mode(self) -> TlsMode:
        if self.tls_mode is not None:
            return self.tls_mode
        return TlsMode.FORCEDTLS if self.tls is not None else TlsMode.NOTLS


class ServerOptions(TypedDict, total=False):
    """The keyword arguments every backend's Server takes (see ServerCore)."""

    tls: Any
    tls_mode: TlsMode | None
    list_exports: bool
    limits: ServerLimits
    policy: ConnectionPolicy | None
    clients: ClientCount | None


class Stoppable(Protocol):
    """A backend session, as the core sees it: it can be told the server is shutting down."""

    def stop(self) -> None: ...


class ServerCore:
    """A server's exports, settings and sessions (see the module docstring).

    ``exports`` maps names to devices or ExportSpecs (a plain device is served read-only), or is a resolver
    called with each name a client asks for (and the client, nbdproto.ClientInfo, when it takes two
    arguments). ``tls``: an ``ssl.SSLContext`` for the server side (TLS is then forced unless ``tls_mode``
    says otherwise). ``list_exports`` answers NBD_OPT_LIST with the mapping's names (and descriptions).
    ``limits``: time limits, the server-wide memory budget and the shutdown grace. ``policy``: which clients
    are served (nbdproto.ConnectionPolicy; by default all). ``clients``: where the policy's counts are kept
    when several servers share them (nbdproto.serving.ClientCount; by default this server's own). A backend sets
    ``logger`` / ``clock`` / ``peer_errors`` on its subclass for the connection log, and gives
    ``stop_accepting``.
    """

    logger = logging.getLogger("nbdproto.server")
    peer_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)

    @staticmethod
    def clock() -> float:
        raise NotImplementedError("a backend's Server gives its clock (time.monotonic)")

    def __init__(
        self,
        exports: Mapping[str, BlockDevice | ExportSpec[Any]] | Resolver | ClientResolver,
        *,
        tls: Any = None,
        tls_mode: TlsMode | None = None,
        list_exports: bool = True,
        limits: ServerLimits = DEFAULT_LIMITS,
        policy: ConnectionPolicy | None = None,
        clients: ClientCount | None = None,
    ) -> None:
        self.exports = Exports(exports, list_exports=list_exports)
        self.clients = clients
        self.policy = policy if policy is not None else ConnectionPolicy()
        self.settings = SessionSettings(
            self.exports.offer, self.exports.lookup, tls, tls_mode, limits, policy=self.policy
        )
        self.limits = limits
        self.log = ConnectionLog(self.logger, self.clock, self.peer_errors)
        self.sessions: set[Any] = set()
        self.stopping = False
        # The clients admitted and not yet gone (set.add and set.discard are atomic: sessions end in any
        # thread), and how many were admitted in all.
        self._admitted: set[ClientInfo] = set()
        self._admitted_count = 0
        self._handshaking: set[ClientInfo] = set()  # admitted, handshake not over (spec_for, or the end)

    def admit(self, client: ClientInfo) -> bool:
        """Whether to serve a newly accepted client, as the policy says (a refusal is logged): call it before
        anything is sent; if True, the session must run under ``serving``, which counts the client out again.
        A backend that accepts in several threads at once calls it under a lock. Besides the policy, the limit
        on connections in their handshake (ServerLimits.max_handshakes) refuses it."""
        most = self.limits.max_handshakes
        if most and len(self._handshaking) >= most:
            self.log.refused(client, f"{most} connections are in their handshake already (max_handshakes)")
            return False
        if self.clients is None:
            reason = self.policy.refusal(client, open_connections=len(self._admitted), admitted=self._admitted_count)
        else:
            reason = self.clients.enter(
                lambda open_connections, admitted: self.policy.refusal(
                    client, open_connections=open_connections, admitted=admitted
                )
            )
        if reason is not None:
            self.log.refused(client, reason)
            return False
        self._admitted.add(client)
        self._admitted_count += 1
        self._handshaking.add(client)
        return True

    def accept_hold_back(self) -> float:
        """Seconds an accept loop that waits for readiness should let pass, once a connection is pending, before
        it takes it: ACCEPT_HOLD_BACK when this server shares its listening socket (``clients``) with another
        that serves fewer connections, so that one takes it (every waiting process is woken for each
        connection, and the first to accept would win: all of a client's connections could land on one
        worker); else 0. A blocking accept needs none: the kernel wakes its waiters one at a time, in turn."""
        if self.clients is not None and self.clients.busier():
            return ACCEPT_HOLD_BACK
        return 0.0

    def spec_for(self, outcome: str | ClientAborted, client: ClientInfo) -> ExportSpec[Any] | None:
        """What serves the handshake's ``outcome``: the spec of the chosen export, or None (the client aborted,
        or the resolver changed its mind since the handshake asked it)."""
        self._handshaking.discard(client)
        if isinstance(outcome, ClientAborted):
            self.log.aborted(client)
            return None
        spec = self.settings.resolve(outcome, client)
        if spec is not None:
            self.log.chose(client, outcome)
        return spec

    @contextlib.contextmanager
    def serving(self, session: Stoppable, client: ClientInfo | str) -> Iterator[None]:
        """Around one session's life: it is counted among the live ones (and told to stop at once if the server
        is already shutting down), and its end is logged with whose fault it was, or as a refusal when the
        policy turned the client away during the handshake (nbdproto.ClientRefused). Exceptions end here.
        When the session was the last one a oneshot server serves, the backend stops accepting."""
        if self.clients is None:
            enter_connection()
        else:
            current_connection.set(self.clients.number())
        self.sessions.add(session)
        if self.stopping:
            session.stop()
        refused = False
        failure: BaseException | None = None
        try:
            yield
        except ClientRefused as exc:
            refused = True
            self.log.refused(client, exc.reason)
        except Exception as exc:  # the log says whose fault it was; the server goes on
            failure = exc
        finally:
            self.sessions.discard(session)
            if self.clients is not None and client in self._admitted:
                self.clients.leave()
            self._admitted.discard(client)
            self._handshaking.discard(client)
            if not refused:
                self.log.ended(client, failure)
            if self.policy.oneshot and self._admitted_count and not self._admitted:
                self.stop_accepting()

    def stop_accepting(self) -> None:
        """Stop taking new connections: the policy has no more clients to serve (a oneshot server's client is
        gone). The backend's serving loop then returns (the anyio server's after its shutdown); the sessions
        still alive go on until shutdown."""
        raise NotImplementedError("a backend's Server stops its accept loop")

    def stop_sessions(self) -> None:
        """The shutdown begins: every live session is told (each then ends once nothing is in flight)."""
        self.stopping = True
        for session in list(self.sessions):
            session.stop()
