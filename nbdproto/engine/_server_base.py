"""The state one server connection keeps, shared by its handshake and transmission halves.

``ServerConnection`` is assembled from ``ServerHandshake`` (option haggling, in ``_serverhandshake``) and
``ServerTransmission`` (requests and replies, in ``_servertransmission``); both build on this class, which
holds every attribute either half reads, so each attribute is declared and initialised in one place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from nbdproto.wire import HandshakeFlags, Option, ReceiveBuffer, RemoteProtocolError, headers, layout

from ._events import ConnectionClosed, Event
from ._handshake_events import Export, ExportListing
from ._payloads import Payload
from ._state import NEED_DATA, Phase, TlsMode
from ._transmission_events import Request, WriteRequest

WriteView = Callable[[int, int], "memoryview | None"]
"""Where a write's payload may be received in place: ``(offset, length)`` -> a writable view of the device's own
storage for exactly those bytes, or None (then the payload gets a buffer of its own and the device's pwrite).
See ``ServerConnection.write_view``. The bytes land as they arrive: a client that goes away part-way through a
payload leaves what it sent written, as a server that crashed part-way through a pwrite would (the spec
promises nothing of a write that was not answered)."""

__all__ = ["ServerState", "Progress"]


class Progress:
    """How far the reply to a read sent in several chunks has got (single-chunk replies need none)."""

    __slots__ = ("covered", "ranges")

    def __init__(self) -> None:
        self.covered = 0  # bytes of the read already answered, data and holes
        self.ranges: list[tuple[int, int]] = []  # (offset, size) of each chunk sent, to refuse overlaps


class ServerState:
    """Every attribute of a server connection, and the two helpers both halves use."""

    def __init__(
        self,
        *,
        exports: Iterable[str | ExportListing] | None = None,
        tls: TlsMode = TlsMode.NOTLS,
        structured_replies: bool = True,
        extended_headers: bool = True,
        stream_writes_over: int | None = None,
    ) -> None:
        self._offer = (
            None if exports is None else tuple(e if isinstance(e, ExportListing) else ExportListing(e) for e in exports)
        )
        self.tls_mode = tls
        self._allow_structured = structured_replies
        self._allow_extended = extended_headers and structured_replies
        self._buf = ReceiveBuffer()
        self._out: list[Payload] = []
        self._events: deque[Event] = deque()
        self._phase = Phase.GREETING
        self._eof = False
        self._fixed = False
        self._no_zeroes = False
        self._tls_active = False
        self._skip = 0  # bytes of a refused option payload still to discard
        self._reset_negotiation()
        # The option waiting on the application's answer to ExportRequested: (option, payload fields).
        self._pending: tuple[Option, dict[str, object]] | None = None
        # Transmission state.
        self.export: Export | None = None
        self._size = 0
        self._flags = 0
        self._min_block = 1
        self._max_payload = 0
        # The flags a WRITE may carry on the fast path: none, plus FUA where advertised (empty if read-only).
        self._plain_write_flags: frozenset[int] = frozenset()
        # Requests handed to the application and not fully answered, by cookie; reads answered in several
        # chunks also have a Progress.
        self._in_flight: dict[int, Request] = {}
        self._progress: dict[int, Progress] = {}
        self._disconnecting = False
        # Writes with more payload than this that has not all arrived are handed over as it arrives (None: never).
        self._stream_writes_over = stream_writes_over
        # The streamed write whose payload is still arriving: (cookie, offset of the next part, bytes left).
        self._write_rest: tuple[int, int, int] | None = None
        # A WRITE whose payload is arriving into a buffer of its own: the event to hand over once it is full,
        # and the part of the buffer still to fill (write_buffer / received_into, or receive_data).
        self._payload_event: WriteRequest | None = None
        self._payload_rest: memoryview | None = None
        self.write_view: WriteView | None = None
        """Set by the application (None: never): a checked WRITE whose payload has not started to arrive is
        received straight into the view this gives (``write_buffer``), and handed over with ``in_place`` set."""
        self._request_codec = headers.REQUEST
        self._out.append(
            layout.encode(
                layout.NewstyleGreeting, {"handshake_flags": HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES}
            )
        )

    def _reset_negotiation(self) -> None:
        # Everything the spec says a successful STARTTLS makes the server forget.
        self.structured_replies = False
        self.extended_headers = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}

    def _fail(self, message: str) -> None:
        self._phase = Phase.ERROR
        raise RemoteProtocolError(message)

    def _closed_or_need_data(self) -> Event | type[NEED_DATA]:
        if self._eof:
            self._phase = Phase.CLOSED
            return ConnectionClosed()
        return NEED_DATA
