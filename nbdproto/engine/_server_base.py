"""The state one server connection keeps, shared by its handshake and transmission halves.

``ServerConnection`` is assembled from ``ServerHandshake`` (option haggling, in ``_server_handshake``),
``ServerRequests`` (``_server_requests``) and ``ServerReplies`` (``_server_replies``); all build on ``ServerBase``,
which adds to what both roles keep (``_connection``) every attribute either half reads, so each attribute is
declared and initialised in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from nbdproto.wire import HandshakeFlags, Option, headers, layout

from ._connection import Connection
from ._events import ConnectionClosed, Event
from ._handshake_events import Export, ExportListing
from ._state import NEED_DATA, Role, TlsMode, Trigger
from ._transmission_events import Request, WriteRequest

WriteView = Callable[[int, int], "memoryview | None"]
"""Where a write's payload may be received in place: ``(offset, length)`` -> a writable view of the device's own
storage for exactly those bytes, or None (then the payload gets a buffer of its own and the device's pwrite).
See ``ServerConnection.write_view``. The bytes land as they arrive: a client that goes away part-way through a
payload leaves what it sent written, as a server that crashed part-way through a pwrite would (the spec
promises nothing of a write that was not answered)."""

__all__ = ["ServerBase", "Progress", "WriteView"]


class Progress:
    """How far the reply to a read sent in several chunks has got (single-chunk replies need none)."""

    __slots__ = ("covered", "ranges")

    def __init__(self) -> None:
        self.covered = 0  # bytes of the read already answered, data and holes
        self.ranges: list[tuple[int, int]] = []  # (offset, size) of each chunk sent, to refuse overlaps


class ServerBase(Connection):
    """Every attribute of a server connection, and the helper both halves use."""

    role = Role.SERVER
    _peer = "client"

    _shrunk_from = 0
    """The size before a successful NBD_CMD_RESIZE made the export smaller (RESIZE extension: requests between
    the new and the old end fail with ENOSPC); 0 until then."""

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
        super().__init__()
        self._skip = 0  # bytes of a refused option payload still to discard
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
        self.write_view: WriteView | None = None
        """Set by the application (None: never): a checked WRITE whose payload has not started to arrive is
        received straight into the view this gives (``write_buffer``), and handed over with ``in_place`` set."""
        self._request_codec = headers.REQUEST
        self._reply_form = 0
        """How replies are framed once in transmission: 0 simple, 1 structured, 2 extended (send's fast path)."""
        self._out.append(
            layout.encode(
                layout.NewstyleGreeting, {"handshake_flags": HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES}
            )
        )

    def _closed_or_need_data(self) -> Event | type[NEED_DATA]:
        """What waiting for more bytes means: the end, if the client closed its end where it may."""
        if self._eof:
            self._move(Trigger.PEER_CLOSED)
            return ConnectionClosed()
        return NEED_DATA
