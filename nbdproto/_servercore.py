"""What a server is apart from its I/O, shared by the threads and anyio servers: the exports it offers, the
settings every session gets, the log, the sessions alive, and the seed's per-connection policy.

A backend's ``Server`` is a ``ServerCore`` plus an accept loop and a way to run sessions (threads or tasks):

    session = ServerSession(connection, core.settings, ...)
    with core.serving(session, peer), session:      # registered, its end logged (whose fault it was)
        session.run(core)                             # negotiate, core.spec_for(...) the choice, serve it
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict

from ._device import BlockDevice
from ._events import ClientAborted, ExportListing
from ._export import ExportSpec
from ._limits import DEFAULT_LIMITS, ServerLimits
from ._serverlog import ConnectionLog
from ._state import TlsMode

__all__ = ["Exports", "Resolver", "SessionSettings", "ServerOptions", "ServerCore", "Stoppable"]

Resolver = Callable[[str], "ExportSpec[Any] | None"]
"""Looks an export name up: the spec to serve, or None for an unknown name."""


class Exports:
    """What a server offers: names mapped to devices or ExportSpecs, or a resolver asked for each name.

    A plain device in the mapping is served read-only (the seed's default); an ExportSpec carries its own
    settings. ``offer`` is what NBD_OPT_LIST answers: the mapping's names with their descriptions, or None
    (answered with NBD_REP_ERR_POLICY, the spec's EPERM) for a resolver or when ``list_exports`` is False.
    """

    __slots__ = ("lookup", "offer")

    def __init__(
        self, exports: Mapping[str, BlockDevice | ExportSpec[Any]] | Resolver, *, list_exports: bool = True
    ) -> None:
        self.lookup: Resolver
        self.offer: list[ExportListing] | None
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
    the questions a client asks before choosing (NBD_OPT_INFO, meta contexts); without it INFO is refused
    and meta contexts are offered as base:allocation. ``tls``: the server's ``ssl.SSLContext`` (the engine
    never touches it; the backends wrap the connection with it). ``tls_mode``: the engine's TLS mode; by
    default TLS is forced when there is a context (the seed's rule) and off without one. ``limits``: time
    limits and the memory budget.
    """

    offer: Sequence[str | ExportListing] | None = None
    lookup: Resolver | None = None
    tls: Any = None
    tls_mode: TlsMode | None = None
    limits: ServerLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if self.tls_mode is not None and self.tls_mode is not TlsMode.NOTLS and self.tls is None:
            raise ValueError(f"TLS mode {self.tls_mode.value} needs an ssl.SSLContext")

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


class Stoppable(Protocol):
    """A backend session, as the core sees it: it can be told the server is shutting down."""

    def stop(self) -> None: ...


class ServerCore:
    """A server's exports, settings and sessions (see the module docstring).

    ``exports`` maps names to devices or ExportSpecs (a plain device is served read-only), or is a resolver
    called with each name a client asks for. ``tls``: an ``ssl.SSLContext`` for the server side (TLS is then
    forced unless ``tls_mode`` says otherwise). ``list_exports`` answers NBD_OPT_LIST with the mapping's names
    (and descriptions). ``limits``: time limits, the server-wide memory budget and the shutdown grace.
    A backend sets ``logger`` / ``clock`` / ``peer_errors`` on its subclass for the connection log.
    """

    logger = logging.getLogger("nbdproto.server")
    peer_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)

    @staticmethod
    def clock() -> float:
        raise NotImplementedError("a backend's Server gives its clock (time.monotonic)")

    def __init__(
        self,
        exports: Mapping[str, BlockDevice | ExportSpec[Any]] | Resolver,
        *,
        tls: Any = None,
        tls_mode: TlsMode | None = None,
        list_exports: bool = True,
        limits: ServerLimits = DEFAULT_LIMITS,
    ) -> None:
        self.exports = Exports(exports, list_exports=list_exports)
        self.settings = SessionSettings(self.exports.offer, self.exports.lookup, tls, tls_mode, limits)
        self.limits = limits
        self.log = ConnectionLog(self.logger, self.clock, self.peer_errors)
        self.sessions: set[Any] = set()
        self.stopping = False

    def spec_for(self, outcome: str | ClientAborted, peer: object) -> ExportSpec[Any] | None:
        """What serves the handshake's ``outcome``: the spec of the chosen export, or None (the client aborted,
        or the resolver changed its mind since the handshake asked it)."""
        if isinstance(outcome, ClientAborted):
            self.log.aborted(peer)
            return None
        spec = self.exports.lookup(outcome)
        if spec is not None:
            self.log.chose(peer, outcome)
        return spec

    @contextlib.contextmanager
    def serving(self, session: Stoppable, peer: object) -> Iterator[None]:
        """Around one session's life: it is counted among the live ones (and told to stop at once if the server
        is already shutting down), and its end is logged with whose fault it was. Exceptions end here."""
        self.sessions.add(session)
        if self.stopping:
            session.stop()
        failure: BaseException | None = None
        try:
            yield
        except Exception as exc:  # the log says whose fault it was; the server goes on
            failure = exc
        finally:
            self.sessions.discard(session)
            self.log.ended(peer, failure)

    def stop_sessions(self) -> None:
        """The shutdown begins: every live session is told (each then ends once nothing is in flight)."""
        self.stopping = True
        for session in list(self.sessions):
            session.stop()
