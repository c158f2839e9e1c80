"""ServerConnection: the server role of NBD, from greeting to the last reply, without doing any I/O.

The driver (a backend, or any code that owns a socket) feeds the client's bytes to ``receive_data``, takes
events from ``next_event`` (in transmission, a batch of requests at a time from ``next_requests``) and answers
them with ``send``, and writes out whatever ``data_to_send`` returns.

What the application sees is deliberately small: the engine answers every option itself, asking the
application only which exports exist (``ExportRequested`` -> ``Export`` / ``ExportUnknown``); it validates every
request and answers invalid ones itself, so the application only ever sees requests it can carry out; and it
turns the application's replies into simple, structured or extended reply messages as negotiated.

The application's side of the negotiate-then-serve contract: ``exports`` is the offer list answered to NBD_OPT_LIST
(None answers NBD_REP_ERR_POLICY, the spec's way of saying EPERM); the chosen name arrives in ``ExportRequested``;
NBD_OPT_ABORT surfaces as ``ClientAborted``; exports are read-only unless the application's ``Export`` says
otherwise; the TLS mode is the driver's choice (backends force TLS when they are given a certificate).

The handshake lives in ``_server_handshake``, transmission in ``_server_requests`` and ``_server_replies``, what
they share in ``_server_base`` and ``_connection``; when each message is allowed, in the transition tables of
``_state``. This module is the public face.
"""

from __future__ import annotations

import functools

from nbdproto.wire import LocalProtocolError, headers

from . import _replies
from ._events import Event
from ._server_handshake import ServerHandshake
from ._server_replies import ServerReplies
from ._server_requests import ServerRequests
from ._state import NEED_DATA, PAUSED, SENDS, Phase, Role
from ._transmission_events import (
    WORK_TYPES,
    BlockStatusReply,
    ErrorReply,
    ReadData,
    ReadHole,
    ReadRequest,
    SuccessReply,
    WriteRequest,
)

__all__ = ["ServerConnection"]

_SENDABLE = SENDS[Role.SERVER]
_TRANSMISSION = Phase.TRANSMISSION
_simple_ok = functools.partial(headers.SIMPLE_REPLY.pack, headers.SIMPLE_REPLY.magic, 0)  # (cookie): a success
_structured_whole_read, _extended_whole_read = _replies.structured_whole_read, _replies.extended_whole_read


class ServerConnection(ServerHandshake, ServerRequests, ServerReplies):
    """The server side of one NBD connection (fixed newstyle handshake, then transmission).

    ``exports``: the names (or ``ExportListing``s with descriptions) answered to NBD_OPT_LIST, or None to
    refuse listing with NBD_REP_ERR_POLICY. ``tls``: the TLS mode (spec: "Server-side requirements").
    ``structured_replies`` / ``extended_headers``: whether the server agrees to those options (turn them off to
    behave like an older server). ``stream_writes_over``: a WRITE with a larger payload that has not all
    arrived is handed over as it arrives (WriteRequest with ``more`` set, then WritePayload events), so a driver
    need not buffer a whole large payload; None (the default) waits for every payload. ``write_view`` (an
    attribute the application may set, see WriteView): where a write's payload may be received in place, in the
    device's own storage instead of a buffer (no copy from one to the other). The greeting is queued at once:
    call ``data_to_send()`` before reading.
    """

    # --- The driver's interface --------------------------------------------------------------------------

    @property
    def receiving_request(self) -> bool:
        """True while part of a request (or option) has arrived and the rest has not: a header, or some of a
        payload. A driver bounds how long it waits for the rest."""
        return bool(self._buf.size or self._skip or self._write_rest is not None or self._into is not None)

    def write_buffer(self) -> memoryview | None:
        """Where the next bytes from the client belong when they are the rest of a write's payload: the unfilled
        part of the payload's own buffer, else None. A driver may receive straight into it (e.g.
        ``socket.recv_into``) and report the count with ``received_into``, so that a payload that straddles
        receive chunks is never joined or copied in Python; passing the bytes to ``receive_data`` is equally
        correct."""
        return self._into

    @property
    def request_header_size(self) -> int:
        """The size of a request header in transmission: 28 bytes, 32 once extended headers are negotiated."""
        return self._request_codec.size

    @property
    def arriving_write_size(self) -> int:
        """The size on the wire (header and payload) of the WRITE whose payload is arriving into
        ``write_buffer()``, else 0: a driver sizes its receives by it (nbdproto.serving.ReceiveSize), so that they end
        where requests end."""
        event = self._payload_event
        if self._into is None or event is None:
            return 0
        return self._request_codec.size + len(event.data)

    @property
    def in_flight(self) -> int:
        """Requests handed to the application whose replies are not complete yet."""
        return len(self._in_flight)

    def in_place_writes(self) -> list[WriteRequest]:
        """The writes received in place (``write_view``) that have no reply yet: handed over and not answered,
        or with their payload still arriving. Their views are the application's to let go of when the
        connection ends (nbdproto.serving calls the device's ``write_view_ended`` for each)."""
        return [request for request in self._in_flight.values() if type(request) is WriteRequest and request.in_place]

    def next_requests(self, batch: list[Event]) -> Event | type[NEED_DATA] | type[PAUSED]:
        """In transmission: append every request the received bytes hold to ``batch``, in order (the requests
        of ``WORK_TYPES``: all but NBD_CMD_DISC, and the parts of streamed writes), and return the first event
        that is not one (NEED_DATA, PAUSED, ``ConnectionClosed`` or ``DisconnectRequest``).

        The loop a server runs over ``next_event``, in one call: the requests a chunk's fast path already
        parsed move to ``batch`` at once. Raises as ``next_event`` does; the requests appended before that
        stay in ``batch``."""
        queued, next_event, work, append = self._events, self.next_event, WORK_TYPES, batch.append
        while True:
            event = next_event()
            if type(event) not in work:
                return event
            append(event)  # type: ignore[arg-type]  # one of WORK_TYPES
            if queued:
                # In transmission the queue holds only the requests _queue_requests put there behind the one
                # next_event just returned: every one of them work.
                batch.extend(queued)
                queued.clear()

    def answer_lone_read(self, read: ReadRequest) -> bytes:
        """Answer ``read``, a READ that ``receive_lone_read`` handed over, with all of its data at once: the
        reply's header, which the driver sends right away followed by exactly ``read.length`` bytes of data (the
        read is no longer in flight). ``send(ReadData(...))`` says the same, through the queue of
        ``data_to_send``; this is the one-request road's, whose reply goes out before anything is queued.

        The header is chosen by the reply form as ``send`` chooses it for a whole read (both are held to give
        the same bytes: tests/test_lone_reads.py)."""
        cookie, size = read.cookie, read.length
        del self._in_flight[cookie]
        form = self._reply_form
        if form == 0:
            return _simple_ok(cookie)
        if form == 1:
            return _structured_whole_read(cookie, size + 8, read.offset)
        return _extended_whole_read(cookie, read.offset, size + 8, read.offset)

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        if self._into is not None:
            # The rest of a write's payload goes to its own buffer; what follows it, to the receive buffer.
            data = self._fill_into(data)
            if not data:
                return
        skip = self._skip
        if skip:
            # Discard a refused option's payload as it arrives, without buffering it.
            taken = min(skip, len(data))
            self._skip = skip - taken
            data = data[taken:]
            if not data:
                return
        self._buf.append(data)

    def send(self, event: Event) -> None:
        """Answer the client: ``Export`` / ``ExportUnknown`` for an ExportRequested, or a reply to a request
        (``ReadData``, ``ReadHole``, ``BlockStatusReply``, ``SuccessReply``, ``ErrorReply``), as the phase
        allows (``_state.SENDS``). Raises LocalProtocolError when the event is not allowed now or does not fit
        the request it answers; that ends the connection."""
        kind = type(event)
        try:
            # The common reply first: one chunk of data, in transmission (SENDS allows it there).
            if kind is ReadData and self._phase is _TRANSMISSION:
                cookie, data, offset = event.cookie, event.data, event.offset  # type: ignore[attr-defined]
                request = self._in_flight.pop(cookie, None)
                size = len(data)
                if (
                    type(request) is ReadRequest
                    and offset == request.offset
                    and size == request.length
                    and cookie not in self._progress
                ):
                    # The whole read in one chunk (what _read_chunk does for it, without the call).
                    form, out = self._reply_form, self._out
                    if form == 0:
                        out.append(_simple_ok(cookie))
                    elif form == 1:
                        out.append(_structured_whole_read(cookie, size + 8, offset))
                    else:
                        out.append(_extended_whole_read(cookie, offset, size + 8, offset))
                    out.append(data)
                    return
                if request is not None:
                    self._in_flight[cookie] = request  # not that: the full path below
                self._read_chunk(cookie, event.offset, len(data), data, event.done)  # type: ignore[attr-defined]
                return
            if kind is SuccessReply and self._phase is _TRANSMISSION and not self.extended_headers:
                # The next most common: a write done (what _success does for it, without the call).
                cookie = event.cookie  # type: ignore[attr-defined]
                in_flight = self._in_flight
                request = in_flight.pop(cookie, None)
                if type(request) is WriteRequest and (self._write_rest is None or self._write_rest[0] != cookie):
                    self._out.append(_simple_ok(cookie))
                    return
                if request is not None:
                    in_flight[cookie] = request  # not that: the full path below
            phase = self._phase
            if phase is Phase.ERROR:
                raise LocalProtocolError("the connection already failed")
            if kind not in _SENDABLE.get(phase, ()):
                raise LocalProtocolError(f"cannot send {kind.__name__} in phase {phase.value}")
            if phase is Phase.CLOSED:
                return  # the client is gone; a late reply has nowhere to go
            if kind is SuccessReply:
                self._success(event.cookie)  # type: ignore[attr-defined]
            elif kind is ReadHole:
                self._read_chunk(event.cookie, event.offset, event.length, None, event.done)  # type: ignore[attr-defined]
            elif kind is ReadData:
                self._read_chunk(event.cookie, event.offset, len(event.data), event.data, event.done)  # type: ignore[attr-defined]
            elif kind is ErrorReply:
                self._error_reply(event)  # type: ignore[arg-type]
            elif kind is BlockStatusReply:
                self._block_status(event)  # type: ignore[arg-type]
            else:
                self._answer_export(event)  # type: ignore[arg-type]
        except LocalProtocolError:
            self._break()
            raise
