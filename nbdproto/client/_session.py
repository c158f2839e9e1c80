"""One client connection's decisions that are not I/O, shared by the threads and anyio clients.

A backend's client is an I/O loop around a ``ClientSessionLogic``: the logic owns the engine
(``ClientConnection``) and the handshake plan (``ClientNegotiation``), numbers requests, keeps the ones
waiting for replies, and turns each reply into the caller's result or exception; the backend moves bytes and
decides who waits how (a reader thread and events, or tasks taking turns at reading). The handshake loop of
either backend reads::

    while (step := logic.handshake_step()) is not HandshakeStep.DONE:
        start_tls() if step is HandshakeStep.START_TLS else exchange()   # exchange: send, then receive

``ClientRequests`` is the other shared half: every request method of both clients (``pread``, ``pwrite``,
``flush``, ``trim``, ``zero``, ``cache``, ``block_status``, ``dirty_extents``), written once. Each builds its
request and hands it to the backend's ``_call``, which sends it, waits for the reply and returns what the
method's ``finish`` makes of it; the overloads type each method for both worlds: a value from a blocking
client, an awaitable of it from an async one.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, cast, overload

from nbdproto.engine import (
    NEED_DATA,
    PAUSED,
    BlockStatusReply,
    BlockStatusRequest,
    CacheRequest,
    ConnectionClosed,
    DisconnectRequest,
    ErrorReply,
    Event,
    Export,
    ExportList,
    Extent,
    FlushRequest,
    HandshakeComplete,
    HandshakeStep,
    Phase,
    ReadReply,
    ReadRequest,
    Reply,
    Request,
    StartTLS,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from nbdproto.wire import CommandFlags, LocalProtocolError, NBDError, TransmissionFlags

from ._dirty import DIRTY_BITMAP_PREFIX, DirtyExtent, dirty_extents
from ._negotiation import ClientNegotiation, Inquiry

if TYPE_CHECKING:
    from nbdproto.engine import ClientConnection

__all__ = ["ClientSessionLogic", "ClientRequests", "ConnectOptions", "Blocking", "Awaiting"]

T = TypeVar("T")
_NO_FLAGS = CommandFlags(0)


class ConnectOptions(TypedDict, total=False):
    """The keyword arguments of every client's ``connect`` (besides the URI), as nbdproto.client.plan_connection
    takes them: where to connect without a URI (``host``, ``port``, ``socket_path``, ``export_name``), TLS
    (``tls``: the client ``ssl.SSLContext``; ``tls_psk``: (identity, key) to authenticate with a pre-shared key
    instead, Python 3.13+; ``require_tls``: refuse a server that does not upgrade, the default for nbds URIs and
    with a key), what to negotiate (``structured_replies``, ``extended_headers``, ``meta_contexts``,
    ``discover_meta_contexts``: first ask for every context the export offers, kept in the client's
    ``available_meta_contexts``; ``block_sizes``: ask for the server's block-size constraints, and so be bound by
    them), ``strict``: refuse, before sending, any request the server said it cannot serve
    (ClientRequests.strict),
    and ``timeout``: seconds any single wait may take, the connect and handshake included
    and each request after it (None: no limit). ``command``: instead of a URI, a server to start (argv, e.g.
    ``["nbdkit", "memory", "1G"]``) with socket activation on a private unix socket, stopped when the client
    closes (libnbd's connect_systemd_socket_activation); ``export_name`` and TLS apply to it as to a URI."""

    command: Sequence[str]
    host: str
    port: int
    socket_path: str | None
    export_name: str
    tls: Any
    tls_psk: tuple[str, bytes] | None
    require_tls: bool | None
    structured_replies: bool
    extended_headers: bool
    meta_contexts: Sequence[str]
    discover_meta_contexts: bool
    block_sizes: bool
    strict: bool
    timeout: float | None


class ClientSessionLogic:
    """The I/O-free half of one client connection: ``engine`` driven through the handshake ``plan``, then
    requests numbered and matched with their replies."""

    def __init__(self, engine: ClientConnection, plan: ClientNegotiation) -> None:
        self.engine = engine
        self.plan = plan
        self._cookies = itertools.count(1)
        self.failure: BaseException | None = None
        """Why the connection cannot be used any more, once it cannot."""

    # --- Handshake ------------------------------------------------------------------------------------------

    def handshake_step(self) -> HandshakeStep:
        """Advance the handshake as far as the bytes received allow and say what the driver must do next.
        Raises NegotiationError when the plan cannot be followed, ConnectionError when the server closes,
        RemoteProtocolError when it breaks the protocol."""
        engine, plan = self.engine, self.plan
        while not plan.done:
            event = engine.next_event()
            if event is NEED_DATA:
                return HandshakeStep.EXCHANGE
            if event is PAUSED:
                raise LocalProtocolError("the handshake stalled with nothing to send")
            if type(event) is ConnectionClosed:
                raise ConnectionError("the server closed the connection during the handshake")
            send = plan.step(event)  # type: ignore[arg-type]
            if type(event) is StartTLS:
                return HandshakeStep.START_TLS
            if send is not None:
                engine.send(send)
        return HandshakeStep.DONE

    def tls_established(self) -> None:
        """The driver finished the TLS upgrade the last step asked for: the handshake goes on under TLS."""
        self.engine.tls_established()
        self.engine.send(self.plan.tls_done())

    @property
    def result(self) -> HandshakeComplete | ExportList | Inquiry | None:
        """How the handshake ended: HandshakeComplete (transmission), the ExportList of a listing, or the
        Inquiry of an opt-mode handshake."""
        return self.plan.result

    # --- Transmission ---------------------------------------------------------------------------------------

    def submit(self, make: Callable[[int], Request]) -> int:
        """Queue the request ``make(cookie)`` with a fresh cookie (the engine checks it first: a request the
        server cannot take raises LocalProtocolError before anything is queued) and return the cookie.
        ConnectionError once the connection failed or left transmission."""
        if self.failure is not None:
            raise ConnectionError(f"the connection failed: {self.failure}") from self.failure
        if self.engine.phase is not Phase.TRANSMISSION:
            raise ConnectionError(f"the connection is {self.engine.phase.value}")
        cookie = next(self._cookies)
        self.engine.send(make(cookie))
        return cookie

    def replies(self) -> Iterator[Reply]:
        """Every complete reply the received bytes hold. Raises ConnectionError when the server closed the
        connection. When the server said it is shutting down (ESHUTDOWN), NBD_CMD_DISC is queued, as the spec
        asks: the driver sends it with its next send."""
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            if type(event) is ConnectionClosed:
                raise ConnectionError("the server closed the connection")
            yield cast(Reply, event)
            if engine.must_disconnect and engine.phase is Phase.TRANSMISSION:
                engine.send(DisconnectRequest())

    def fail(self, failure: BaseException) -> None:
        """The connection broke (or a request's wait ran out, leaving its state unknown): no more requests."""
        if self.failure is None:
            self.failure = failure

    def disconnect(self) -> bool:
        """Queue NBD_CMD_DISC if the connection is in transmission and sound; whether it was queued."""
        if self.failure is None and self.engine.phase is Phase.TRANSMISSION:
            self.engine.send(DisconnectRequest())
            return True
        return False

    @staticmethod
    def outcome(reply: Event | BaseException) -> Event:
        """The reply a request got, or the exception it raises: NBDError for the server's error reply,
        ConnectionError when the connection failed before the reply came."""
        if isinstance(reply, BaseException):
            raise ConnectionError(f"the connection failed: {reply}") from reply
        if type(reply) is ErrorReply:
            error: ErrorReply = reply
            raise NBDError(int(error.error), error.message or os.strerror(int(error.error)))
        return reply


class Blocking:
    """ClientRequests' mode for a client whose methods block and return their results."""


class Awaiting:
    """ClientRequests' mode for a client whose methods return awaitables of their results."""


M = TypeVar("M", Blocking, Awaiting)


def _read_data(reply: Event) -> memoryview:
    read: ReadReply = reply  # type: ignore[assignment]
    return read.data


def _read_bytes(reply: Event) -> bytes:
    read: ReadReply = reply  # type: ignore[assignment]
    return bytes(read.data)


def _nothing(reply: Event) -> None:
    return None


def _flags(**wanted: bool) -> CommandFlags:
    flags = _NO_FLAGS
    for name, on in wanted.items():
        if on:
            flags |= CommandFlags[name]
    return flags


class ClientRequests(Generic[M]):
    """The request methods of both clients (see the module docstring). A backend subclasses
    ``ClientRequests[Blocking]`` or ``ClientRequests[Awaiting]`` and gives ``logic`` and ``_call``."""

    logic: ClientSessionLogic
    handshake: HandshakeComplete | None = None
    listing: ExportList | None = None

    def _call(self, make: Callable[[int], Request], finish: Callable[[Event], Any]) -> Any:
        """Send ``make(cookie)``, wait for its reply, and return ``finish(reply)`` (raising as
        ClientSessionLogic.outcome says): directly, or as an awaitable."""
        raise NotImplementedError

    # --- What the export is -------------------------------------------------------------------------------

    @property
    def export(self) -> Export:
        """The export this client is connected to (a listing connection has none)."""
        if self.handshake is None:
            raise RuntimeError("a listing connection has no export")
        return self.handshake.export

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def flags(self) -> TransmissionFlags:
        return self.export.flags

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        """The meta contexts agreed for block status: id -> name."""
        return self.logic.engine.meta_contexts

    @property
    def available_meta_contexts(self) -> tuple[str, ...] | None:
        """Every meta context the server offered for this export, asked before selecting (the
        ``discover_meta_contexts`` connect option, NBD_OPT_LIST_META_CONTEXT); None when not asked or refused."""
        return self.logic.plan.available_meta_contexts

    @property
    def strict(self) -> bool:
        """Strict mode: every request is checked against all the server stated before it is sent, and refused
        with LocalProtocolError (nothing sent, the connection unharmed), ``error_code`` the errno a server
        would answer. Always refused, strict or not: a command the server did not advertise (EINVAL: "TRIM
        was not advertised"), a write on a read-only export (EPERM), a command flag it did not advertise
        (FUA, FAST_ZERO, DF: EINVAL "... was not advertised"), flags a command does not take, an empty range or
        one past the end (EINVAL, ENOSPC for writes), a read over the maximum payload (EOVERFLOW), block
        status without a meta context. Refused only when strict: a range not aligned to the server's minimum
        block size although the client did not ask for block sizes (EINVAL "not aligned"), and a write over
        the maximum payload (EINVAL "exceeds the maximum payload"). Off by default; the ``strict``
        connect option sets it, and it may be switched at any time."""
        return self.logic.engine.strict

    @strict.setter
    def strict(self, on: bool) -> None:
        self.logic.engine.strict = on

    def can(self, flag: TransmissionFlags) -> bool:
        """Whether the server advertised ``flag`` (e.g. ``TransmissionFlags.SEND_TRIM``)."""
        return bool(self.export.flags & flag)

    # --- Requests -------------------------------------------------------------------------------------------

    @overload
    def pread(self: ClientRequests[Blocking], length: int, offset: int, *, df: bool = False) -> bytes: ...
    @overload
    def pread(self: ClientRequests[Awaiting], length: int, offset: int, *, df: bool = False) -> Awaitable[bytes]: ...
    def pread(self, length: int, offset: int, *, df: bool = False) -> Any:
        """``length`` bytes at ``offset`` (DF: in one piece, no fragments)."""
        buffer = bytearray(length)
        return self._call(lambda cookie: ReadRequest(cookie, offset, length, _flags(DF=df), buffer), _read_bytes)

    @overload
    def pread_into(
        self: ClientRequests[Blocking], buffer: bytearray | memoryview, offset: int, *, df: bool = False
    ) -> memoryview: ...
    @overload
    def pread_into(
        self: ClientRequests[Awaiting], buffer: bytearray | memoryview, offset: int, *, df: bool = False
    ) -> Awaitable[memoryview]: ...
    def pread_into(self, buffer: bytearray | memoryview, offset: int, *, df: bool = False) -> Any:
        """Read ``len(buffer)`` bytes at ``offset`` straight into ``buffer``; returns a view of it."""
        flags = _flags(DF=df)
        return self._call(lambda cookie: ReadRequest(cookie, offset, len(buffer), flags, buffer), _read_data)

    @overload
    def pwrite(
        self: ClientRequests[Blocking], data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False
    ) -> None: ...
    @overload
    def pwrite(
        self: ClientRequests[Awaiting], data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False
    ) -> Awaitable[None]: ...
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> Any:
        """Write ``data`` at ``offset`` (FUA: durably before the reply)."""
        return self._call(lambda cookie: WriteRequest(cookie, offset, data, _flags(FUA=fua)), _nothing)

    @overload
    def flush(self: ClientRequests[Blocking]) -> None: ...
    @overload
    def flush(self: ClientRequests[Awaiting]) -> Awaitable[None]: ...
    def flush(self) -> Any:
        """Make every completed write durable."""
        return self._call(FlushRequest, _nothing)

    @overload
    def trim(self: ClientRequests[Blocking], length: int, offset: int, *, fua: bool = False) -> None: ...
    @overload
    def trim(self: ClientRequests[Awaiting], length: int, offset: int, *, fua: bool = False) -> Awaitable[None]: ...
    def trim(self, length: int, offset: int, *, fua: bool = False) -> Any:
        """The range's contents need not be kept."""
        return self._call(lambda cookie: TrimRequest(cookie, offset, length, _flags(FUA=fua)), _nothing)

    @overload
    def zero(
        self: ClientRequests[Blocking],
        length: int,
        offset: int,
        *,
        may_trim: bool = True,
        fast: bool = False,
        fua: bool = False,
    ) -> None: ...
    @overload
    def zero(
        self: ClientRequests[Awaiting],
        length: int,
        offset: int,
        *,
        may_trim: bool = True,
        fast: bool = False,
        fua: bool = False,
    ) -> Awaitable[None]: ...
    def zero(self, length: int, offset: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> Any:
        """Make the range read as zero (``may_trim``: a hole will do; ``fast``: fail rather than be slow)."""
        flags = _flags(NO_HOLE=not may_trim, FAST_ZERO=fast, FUA=fua)
        return self._call(lambda cookie: WriteZeroesRequest(cookie, offset, length, flags), _nothing)

    @overload
    def cache(self: ClientRequests[Blocking], length: int, offset: int) -> None: ...
    @overload
    def cache(self: ClientRequests[Awaiting], length: int, offset: int) -> Awaitable[None]: ...
    def cache(self, length: int, offset: int) -> Any:
        """Ask the server to prefetch the range."""
        return self._call(lambda cookie: CacheRequest(cookie, offset, length), _nothing)

    @overload
    def block_status(
        self: ClientRequests[Blocking], length: int, offset: int, *, context: str, req_one: bool = False
    ) -> tuple[Extent, ...]: ...
    @overload
    def block_status(
        self: ClientRequests[Blocking],
        length: int,
        offset: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> dict[str, tuple[Extent, ...]]: ...
    @overload
    def block_status(
        self: ClientRequests[Awaiting], length: int, offset: int, *, context: str, req_one: bool = False
    ) -> Awaitable[tuple[Extent, ...]]: ...
    @overload
    def block_status(
        self: ClientRequests[Awaiting],
        length: int,
        offset: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> Awaitable[dict[str, tuple[Extent, ...]]]: ...
    def block_status(
        self,
        length: int,
        offset: int,
        *,
        context: str | None = None,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> Any:
        """Extents from ``offset``: of the one meta context ``context`` (a tuple), or by context name (every
        agreed context unless ``contexts`` names some). A context that was not agreed raises
        LocalProtocolError. Where the server cannot be asked for some contexts only, it is asked for all and
        the others are dropped."""
        names = dict(self.meta_contexts)
        asked = contexts if context is None else (context,)
        if asked is not None:
            unknown = [name for name in asked if name not in names.values()]
            if unknown:
                agreed = sorted(names.values())
                raise LocalProtocolError(f"meta context {unknown[0]!r} was not negotiated (agreed: {agreed})")
        chosen = tuple(i for i, name in names.items() if asked is None or name in asked)
        wanted = chosen if self.logic.engine.can_choose_contexts and asked is not None else ()
        flags = _flags(REQ_ONE=req_one)

        def by_name(reply: Event) -> Any:
            status: BlockStatusReply = reply  # type: ignore[assignment]
            if context is not None:
                return next(extents for i, extents in status.extents.items() if names[i] == context)
            return {names[i]: extents for i, extents in status.extents.items() if i in chosen}

        return self._call(lambda cookie: BlockStatusRequest(cookie, offset, length, flags, wanted), by_name)

    @overload
    def dirty_extents(
        self: ClientRequests[Blocking], length: int, offset: int, *, bitmap: str
    ) -> tuple[DirtyExtent, ...]: ...
    @overload
    def dirty_extents(
        self: ClientRequests[Awaiting], length: int, offset: int, *, bitmap: str
    ) -> Awaitable[tuple[DirtyExtent, ...]]: ...
    def dirty_extents(self, length: int, offset: int, *, bitmap: str) -> Any:
        """What changed from ``offset``: one block status request for ``qemu:dirty-bitmap:BITMAP`` and, where it
        was agreed, ``base:allocation``, joined (nbdproto.client.dirty_extents): pieces each dirty or clean, and
        reading as zero or not, up to where both answers reach (at least one piece). LocalProtocolError when
        the bitmap's context was not agreed (connect with ``meta_contexts=[..., "qemu:dirty-bitmap:NAME"]``)."""
        context = DIRTY_BITMAP_PREFIX + bitmap
        names = dict(self.meta_contexts)
        if context not in names.values():
            raise LocalProtocolError(f"meta context {context!r} was not negotiated (agreed: {sorted(names.values())})")
        asked = (context, "base:allocation")
        chosen = tuple(i for i, name in names.items() if name in asked)
        wanted = chosen if self.logic.engine.can_choose_contexts else ()

        def joined(reply: Event) -> tuple[DirtyExtent, ...]:
            status: BlockStatusReply = reply  # type: ignore[assignment]
            found = {names[i]: extents for i, extents in status.extents.items()}
            return tuple(dirty_extents(offset, found[context], found.get("base:allocation")))

        return self._call(lambda cookie: BlockStatusRequest(cookie, offset, length, _NO_FLAGS, wanted), joined)
