"""One server connection's decisions that are not I/O, shared by the threads and anyio servers.

A backend's server session is an I/O loop around a ``ServerSessionLogic``: the logic owns the engine
(``ServerConnection``), resolves the exports a client asks about, answers the seed's negotiate-then-serve
contract, and in transmission hands the backend batches of requests and carries them out on the device; the
backend only moves bytes (receive, send, wrap TLS) and decides *where* device calls run (inline, a worker
thread, a task). So the handshake loop of either backend reads::

    while (step := logic.handshake_step()) is not HandshakeStep.DONE:
        start_tls() if step is HandshakeStep.START_TLS else exchange()   # exchange: send, then receive

and the transmission loop takes ``logic.next_batch()`` until it says the connection is over.

``Exports`` is the other half of a ``Server``: the names offered to NBD_OPT_LIST and how a name becomes an
``ExportSpec``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ._admission import ClientInfo, ClientRefused, certificate_subject
from ._budget import MemoryShare
from ._constants import CommandFlags, Errno
from ._device import BlockDevice, Dispatch, dispatch_of
from ._dispatch import OnError, ReadView, carry_out, carry_out_all, error_reply_for, read_view_of, write_view_of
from ._errors import LocalProtocolError
from ._events import (
    BlockStatusRequest,
    CacheRequest,
    ClientAborted,
    ConnectionClosed,
    DisconnectRequest,
    ErrorReply,
    Event,
    ExportRequested,
    FlushRequest,
    HandshakeComplete,
    ReadRequest,
    Request,
    ResizeRequest,
    StartTLS,
    SuccessReply,
    TrimRequest,
    WritePayload,
    WriteRequest,
    WriteZeroesRequest,
)
from ._export import ExportSpec, answer_export_request
from ._receivesize import ReceiveSize
from ._server import ServerConnection
from ._servercore import SessionSettings
from ._state import NEED_DATA, PAUSED, HandshakeStep, Phase

__all__ = [
    "BatchEnd",
    "ServerSessionLogic",
    "Work",
    "FLUSH_AT",
    "RECEIVE",
    "RECEIVE_READY",
    "READY_IN_A_ROW",
    "STREAM_WRITES_OVER",
]

FLUSH_AT = 4 * 1024 * 1024
"""Reply bytes queued after which a driver sends before carrying out more: replies are made only as fast as
they can be sent, so a client that does not read its replies holds at most this much of them (plus one)."""

STREAM_WRITES_OVER = 1024 * 1024
"""Writes with a larger payload are carried out part by part as the payload arrives, instead of waiting for all
of it: a client that sends 32 MiB minus one byte then stalls holds one received chunk, not 32 MiB."""

RECEIVE = -1
"""A step of ``inline_transmission``: send what is queued, then receive the client's next bytes."""

RECEIVE_READY = -2
"""A step of ``inline_transmission`` while big writes stream in place: without sending and without waiting,
receive what has arrived into ``in_place_buffers()``, and hand the count (None: nothing had) to
``received_in_place``. Replies go out at the RECEIVE that follows when nothing had, or after READY_IN_A_ROW
receives that found bytes: a client streaming writes is answered a batch at a time, instead of one send a
write, no reply waits on a receive that waits, and one that never stops sending still gets its replies."""

READY_IN_A_ROW = 64
"""RECEIVE_READY steps that found bytes after which the replies queued are sent anyway (each brings at most one
write's payload and the next header, so at most this many writes' replies wait; nbdcopy keeps 64 requests in
flight on a connection, so it stops to wait for them first)."""

_SHUTTING_DOWN = "the server is shutting down"
_SHUTDOWN_DRAIN = 0.05  # seconds a shutting-down session waits for requests already on their way

Work = Request | WritePayload
"""What a session carries out: a request, or a part of a streamed write's payload."""

_WORK_TYPES = frozenset(
    {
        ReadRequest,
        WriteRequest,
        WritePayload,
        FlushRequest,
        TrimRequest,
        CacheRequest,
        WriteZeroesRequest,
        BlockStatusRequest,
        ResizeRequest,
    }
)


class BatchEnd(enum.Enum):
    """Why ``next_batch`` stopped taking requests."""

    NEED_DATA = "send what is queued, then receive more"
    PAUSED = "replies are owed first (NBD_CMD_DISC, or a request reusing a cookie in flight): let them finish"
    CLOSED = "the client is gone: let in-flight requests finish, flush the device, close"


def _written_already(request: Work) -> bool:
    """A write received in place (WriteRequest.in_place): its data is in the device already, so shutting down
    answers it as carried out, not with ESHUTDOWN (which says it was not)."""
    return type(request) is WriteRequest and request.in_place


class ServerSessionLogic:
    """The I/O-free half of one server connection, set up as ``settings`` say (nbdproto.SessionSettings).
    ``client``: who is at the other end (nbdproto.ClientInfo), which a resolver taking two arguments is given;
    the session adds what the TLS upgrade tells about it."""

    def __init__(
        self,
        settings: SessionSettings,
        *,
        share: MemoryShare | None = None,
        on_device_error: OnError | None = None,
        client: ClientInfo | None = None,
    ) -> None:
        self.engine = ServerConnection(
            exports=settings.offer, tls=settings.effective_tls_mode, stream_writes_over=STREAM_WRITES_OVER
        )
        self.settings = settings
        self.client = client if client is not None else ClientInfo()
        self._lookup = None if settings.lookup is None else self._resolve
        self._limits = settings.limits
        self.share = share
        """This connection's draw on the server's MemoryBudget (None: unlimited). In the threads server
        several threads share the budget: theirs is wrapped so that every call holds the budget's lock."""
        self.on_device_error = on_device_error
        """Told of device failures that are not OSError (bugs worth a traceback; the client gets EIO)."""
        self.shutting_down = False
        """Set by the driver when the server shuts down: requests carried out from then on get ESHUTDOWN."""
        self._closed = False
        self._queued = 0  # reply bytes queued since the last send, counted against FLUSH_AT
        self._queued_cost = 0  # the budget they took, given back once they are sent
        self._failed_writes: dict[int, BaseException] = {}  # streamed writes that failed part-way, by cookie
        self._streamed_flags: dict[int, CommandFlags] = {}  # streamed writes' flags, until their last part
        self._receive_size = ReceiveSize()
        self._header_room = memoryview(bytearray(32))  # in_place_buffers: where the next request header lands
        self._in_place_given = False  # the driver's next count is of a receive into in_place_buffers()
        self._arrived = False  # RECEIVE_READY found bytes waiting
        self.outcome: str | ClientAborted | None = None
        """How the handshake ended: the chosen export's name, or ClientAborted (None while it goes on)."""
        self.spec: ExportSpec[Any] | None = None
        """The export being served, once ``offer_export`` was called."""

    # --- Handshake ------------------------------------------------------------------------------------------

    def handshake_step(self) -> HandshakeStep:
        """Advance the handshake as far as the bytes received allow and say what the driver must do next.

        DONE once the client chose an export (``outcome`` is its name: hand it to ``offer_export``, or check
        it first, as the seed's ``negotiate`` lets an application do) or aborted (``outcome`` is ClientAborted).
        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol.
        """
        engine = self.engine
        while True:
            event = engine.next_event()
            if event is NEED_DATA:
                return HandshakeStep.EXCHANGE
            kind = type(event)
            if kind is ExportRequested:
                requested: ExportRequested = event  # type: ignore[assignment]
                chosen = self.outcome if isinstance(self.outcome, str) else None
                answer = answer_export_request(requested, self._lookup, chosen, self.spec)
                if answer is None:
                    self.outcome = requested.name
                    return HandshakeStep.DONE
                engine.send(answer)
            elif kind is StartTLS:
                return HandshakeStep.START_TLS
            elif kind is HandshakeComplete:
                complete: HandshakeComplete = event  # type: ignore[assignment]
                self.outcome = complete.export.name
                return HandshakeStep.DONE
            elif kind is ClientAborted:
                self.outcome = event  # type: ignore[assignment]
                return HandshakeStep.DONE
            elif kind is ConnectionClosed:
                raise ConnectionError("the connection ended during the handshake")
            else:
                raise LocalProtocolError(f"unexpected {event!r} during the handshake")

    def _resolve(self, name: str) -> ExportSpec[Any] | None:
        return self.settings.resolve(name, self.client)

    def tls_established(self, peer_certificate: Mapping[str, Any] | None, psk_identity: str | None) -> None:
        """The driver finished the TLS upgrade the last step asked for; ``peer_certificate`` is the client's
        verified certificate as ``getpeercert()`` gives it ({} or None without one), ``psk_identity`` the
        pre-shared key identity it used (nbdproto.tls.psk_identity). Raises ClientRefused when the connection
        policy does not accept the certificate's subject: the driver ends the connection there."""
        self.engine.tls_established()
        client = self.client
        client.certificate_subject = certificate_subject(peer_certificate) if peer_certificate else None
        client.psk_identity = psk_identity
        policy = self.settings.policy
        reason = policy.certificate_refusal(client) if policy is not None else None
        if reason is not None:
            raise ClientRefused(reason)

    def offer_export(
        self, device: BlockDevice | ExportSpec[Any], *, read_only: bool = True, description: str = ""
    ) -> bool:
        """Answer the client's choice with ``device`` (read-only unless ``read_only=False``; an ExportSpec
        carries its own settings). True once transmission has begun; False when the engine refused that
        choice (a TLS or block-size rule) and the handshake goes on: keep stepping it (a later choice of the
        same export is answered from this spec).
        """
        if not isinstance(self.outcome, str):
            raise RuntimeError("offer_export() needs a handshake that ended with a chosen export")
        spec = device if isinstance(device, ExportSpec) else ExportSpec(device, description, read_only)
        self.spec = spec
        engine = self.engine
        if engine.phase is Phase.AWAIT_EXPORT:
            engine.send(spec.export(self.outcome))
        if engine.phase is not Phase.TRANSMISSION:
            return False
        complete = engine.next_event()
        assert type(complete) is HandshakeComplete, complete
        return True

    @property
    def transmitting(self) -> bool:
        """True once the handshake is over and requests flow."""
        return self.engine.phase is Phase.TRANSMISSION

    # --- Transmission ---------------------------------------------------------------------------------------

    @property
    def device(self) -> BlockDevice:
        """The device of the export being served."""
        assert self.spec is not None, "no export is being served"
        return self.spec.device  # type: ignore[no-any-return]

    def dispatch(self) -> Dispatch:
        """How the device wants to be called (nbdproto.Dispatch)."""
        return dispatch_of(self.device)

    def write_in_place(self, *, kernel_receives: bool) -> None:
        """Receive write payloads straight into the device's storage from now on, where it offers that (its
        ``write_view``, nbdproto.WriteView) and only the kernel writes there: when the driver receives with
        ``recv_into`` on a plaintext socket (``kernel_receives``). A file truncated under the server then fails
        the receive with EFAULT, where user-space code (TLS) writing into its mapping would die of SIGBUS."""
        write_view = write_view_of(self.device) if kernel_receives else None
        if write_view is not None:
            self.engine.write_view = write_view
            self._receive_size.in_place(self.engine.request_header_size)

    def read_view(self, *, kernel_sends: bool) -> ReadView | None:
        """The device's zero-copy read views, where they may be used: only when the driver hands buffers to
        the kernel as they are (a plaintext socket's sendmsg). User-space code (TLS) must not read them: a file
        truncated under the server is a SIGBUS there, where sendmsg merely fails with EFAULT."""
        return read_view_of(self.device) if kernel_sends else None

    @property
    def mid_request(self) -> bool:
        """True while part of a request has arrived and the rest has not."""
        return self.engine.receiving_request

    @property
    def idle(self) -> bool:
        """True with nothing in flight and no part of a request received: the connection may be closed now
        without cutting anything short (what a shutdown does to an idle connection at once)."""
        engine = self.engine
        return not engine.in_flight and not engine.receiving_request

    def next_wait(self) -> float | None:
        """How long the driver may wait for the client's next bytes (None: as long as it takes): the request
        limit while a request is part-way in, the idle limit while nothing is in flight, a moment when shutting
        down (to take what already arrived: it gets ESHUTDOWN). When the wait runs out, ``waited_too_long``."""
        limits = self._limits
        if self.engine.receiving_request:
            return limits.seconds(limits.request_timeout)
        if self.shutting_down:
            return _SHUTDOWN_DRAIN
        if self.engine.in_flight:
            return None
        return limits.seconds(limits.idle_timeout)

    @property
    def shortest_wait(self) -> float | None:
        """The shortest of the limits ``next_wait`` gives in transmission, shutting down aside (None: there is
        no limit): a timer of this length may stay armed on every receive (a socket's SO_RCVTIMEO, set once);
        when it runs out before ``next_wait`` has, the driver simply waits again."""
        limits = self._limits
        waits = [w for w in (limits.seconds(limits.request_timeout), limits.seconds(limits.idle_timeout)) if w]
        return min(waits, default=None)

    def received(self, got: bytes | int) -> None:
        """Hand the engine what the driver received: bytes (``receive_data``), or a count of bytes it received
        straight into ``engine.write_buffer()`` (``received_into``), or into ``in_place_buffers()`` when it
        gave the driver's receive its buffers. b"" or 0: the client closed."""
        if self._in_place_given:
            if type(got) is int:
                self._split_in_place(got)
                return
            self._in_place_given = False  # b"": the wait ran out (waited_too_long)
        if type(got) is int:
            engine = self.engine
            self._receive_size.received(got, True, engine.arriving_write_size)
            engine.received_into(got)
        else:
            self.engine.receive_data(got)  # type: ignore[arg-type]
            self._receive_size.received(len(got), False)  # type: ignore[arg-type]

    def in_place_buffers(self) -> list[memoryview] | None:
        """While big writes stream in place (``write_in_place``): the buffers for the next receive, which
        brings the rest of the arriving payload, into place, and the request header after it, with one
        ``recvmsg_into`` (the header alone when no payload is arriving); the count goes to ``received`` (or,
        at RECEIVE_READY, ``received_in_place``). None otherwise: receive as ``receive_size`` and
        ``engine.write_buffer()`` say. Without it a write took two receives: its header's, and its payload's."""
        if not self._receive_size.streaming_in_place:
            self._in_place_given = False
            return None
        self._in_place_given = True
        header = self._header_room[: self.engine.request_header_size]
        target = self.engine.write_buffer()
        return [header] if target is None else [target, header]

    def received_in_place(self, count: int | None) -> None:
        """What a RECEIVE_READY step brought into ``in_place_buffers()``: a count (0: the client closed), or
        None when nothing had arrived."""
        self._arrived = count is not None
        if count is None:
            self._in_place_given = False
        else:
            self.received(count)

    def _split_in_place(self, count: int) -> None:
        """Hand over a count received into ``in_place_buffers()``: the part in the payload's place, then the
        header bytes after it."""
        self._in_place_given = False
        target = self.engine.write_buffer()
        into_target = 0 if target is None else min(count, len(target))
        if into_target or (count == 0 and target is not None):
            self.received(into_target)
        if count > into_target or (count == 0 and target is None):
            self.received(bytes(self._header_room[: count - into_target]))

    @property
    def receive_size(self) -> int:
        """How many bytes to ask of the next receive that is not into ``engine.write_buffer()``
        (nbdproto.ReceiveSize: more while the client streams big writes). A driver whose receives bring at
        most a TLS record (16 KiB) asks for RECV_SIZE instead: asking for more only costs it memory."""
        return self._receive_size.next

    def waited_too_long(self) -> bytes:
        """What a wait that ran out means: TimeoutError for a request stalled part-way; otherwise (idle too
        long, or shutting down) the end of the connection, as if the client had closed it: b""."""
        if self.engine.receiving_request:
            limit = self._limits.request_timeout
            raise TimeoutError(f"the rest of a request did not arrive within {limit} s")
        return b""

    def begin_shutdown(self) -> None:
        """The server is shutting down: work carried out from now on gets ESHUTDOWN, and waits for the client
        are cut short (``next_wait``)."""
        self.shutting_down = True
        self.engine.write_view = None  # a write now refused must leave no trace: none is received in place

    def next_batch(self, batch: list[Work]) -> BatchEnd:
        """Move every request the received bytes hold into ``batch`` (in order), and say what ended it.

        NBD_CMD_DISC is noted and not returned (the engine answers nothing to it, and stops reading). Parts of
        a streamed write (WritePayload) are work too, carried out like requests.
        """
        engine = self.engine
        work = _WORK_TYPES
        while True:
            event = engine.next_event()
            if type(event) in work:
                batch.append(event)  # type: ignore[arg-type]
            elif event is NEED_DATA:
                return BatchEnd.NEED_DATA
            elif event is PAUSED:
                return BatchEnd.PAUSED
            elif type(event) is ConnectionClosed:
                return BatchEnd.CLOSED
            elif type(event) is not DisconnectRequest:
                raise LocalProtocolError(f"unexpected {event!r} in transmission")

    def inline_transmission(self, read_view: ReadView | None) -> Iterator[int]:
        """The whole of transmission for a driver that carries requests out where it reads them, as steps.

        Each value yielded means "send what is queued (then call ``sent()``)", and then: RECEIVE, receive the
        client's next bytes into the engine; a positive number, wait until the budget share grants that many
        bytes (the work goes on with them). RECEIVE_READY alone sends nothing (see there). It returns once the
        connection is over: everything owed is sent.
        """
        batch: list[Work] = []
        ready = 0  # RECEIVE_READY steps in a row that found bytes, since replies were last sent
        while True:
            end = self.next_batch(batch)
            yield from self.carry_out_inline(batch, read_view)
            batch.clear()
            if end is BatchEnd.CLOSED:
                yield 0
                return
            if end is BatchEnd.NEED_DATA and self._receive_size.streaming_in_place and ready < READY_IN_A_ROW:
                self._arrived = False
                yield RECEIVE_READY
                if self._arrived:
                    ready += 1
                    continue
            ready = 0
            # PAUSED (a request waiting for its cookie to come free, or DISC): the batch answered it all.
            yield RECEIVE if end is BatchEnd.NEED_DATA else 0

    def carry_out_inline(self, batch: Sequence[Work], read_view: ReadView | None) -> Iterator[int]:
        """Carry out ``batch`` here and now, in order, queueing the replies.

        A generator: it stops to let the driver act before going on. Each value it yields means "send what is
        queued and call ``sent()``"; a positive value also means "then wait until the budget share grants
        that many bytes" (``share.try_take``: the driver takes them, and the work goes on with them). Replies
        are made only as they can be sent: no more than FLUSH_AT bytes of them are queued at a time.
        """
        if not batch:
            return
        engine, device, contexts, share = self.engine, self.device, self.engine.meta_contexts, self.share
        on_error = self.on_device_error
        if hasattr(device, "call_batch"):
            yield from self._carry_out_batched(batch)
            return
        for request in batch:
            kind = type(request)
            streamed = kind is WritePayload or (kind is WriteRequest and request.more)  # type: ignore[union-attr]
            if self.shutting_down and not streamed and not _written_already(request):
                self.refuse_shutting_down(request)  # type: ignore[arg-type]
                continue
            if kind is ReadRequest:
                length = request.length  # type: ignore[union-attr]
                if read_view is None and share is not None:
                    if not share.try_take(length):
                        yield length
                    self._queued_cost += length
                engine.send(carry_out(device, request, contexts, on_error, read_view))  # type: ignore[arg-type]
                self._queued += length
                if self._queued >= FLUSH_AT:
                    yield 0
            elif streamed:
                reply = self.carry_out_part(request)  # type: ignore[arg-type]
                if reply is not None:
                    engine.send(reply)
            else:
                engine.send(carry_out(device, request, contexts, on_error, read_view))  # type: ignore[arg-type]

    def _carry_out_batched(self, batch: Iterable[Work]) -> Iterator[int]:
        """carry_out_inline for a device that takes many calls at once (``call_batch``: a remote device keeps
        them all in flight together): each run of plain requests goes to it in one call."""
        engine, share = self.engine, self.share
        run: list[Request] = []
        for request in (*batch, None):
            kind = type(request)
            streamed = kind is WritePayload or (kind is WriteRequest and request.more)  # type: ignore[union-attr]
            if request is not None and not streamed and not (self.shutting_down and not _written_already(request)):
                run.append(request)  # type: ignore[arg-type]
                continue
            if run:
                cost = sum(r.length for r in run if type(r) is ReadRequest)
                if share is not None and not share.try_take(cost):
                    yield cost
                self._queued_cost += cost
                for reply in carry_out_all(self.device, run, engine.meta_contexts, self.on_device_error):
                    engine.send(reply)
                self._queued += cost
                run = []
                if self._queued >= FLUSH_AT:
                    yield 0
            if request is None:
                return
            if streamed:
                part = self.carry_out_part(request)  # type: ignore[arg-type]
                if part is not None:
                    engine.send(part)
            else:
                self.refuse_shutting_down(request)  # type: ignore[arg-type]

    def sent(self) -> None:
        """The driver sent everything queued: the memory the replies held is free again."""
        if self._queued_cost and self.share is not None:
            self.share.give(self._queued_cost)
        self._queued = self._queued_cost = 0

    def carry_out_one(self, request: Request, read_view: ReadView | None) -> Event:
        """Carry out one request (not part of a streamed write) and return its reply: for drivers that carry
        out requests concurrently, each in a thread or task of its own."""
        if self.shutting_down and not _written_already(request):
            return ErrorReply(request.cookie, Errno.ESHUTDOWN, _SHUTTING_DOWN)
        return carry_out(self.device, request, self.engine.meta_contexts, self.on_device_error, read_view)

    def carry_out_part(self, part: WriteRequest | WritePayload) -> Event | None:
        """Write one part of a streamed write (see WriteRequest.more): the parts of one write must be carried
        out in order, by the reading side. Returns the write's reply after its last part, else None. A part
        that fails fails the whole write (the rest is received and dropped), and so does shutting down before
        the first part: ESHUTDOWN after the last."""
        cookie = part.cookie
        failure = self._failed_writes.get(cookie)
        last = type(part) is WritePayload and part.last
        fua = False
        if type(part) is WriteRequest:
            self._streamed_flags[cookie] = part.flags
            if self.shutting_down:
                failure = self._failed_writes[cookie] = OSError(errno.ESHUTDOWN, _SHUTTING_DOWN)
        if last:
            fua = bool(self._streamed_flags.pop(cookie) & CommandFlags.FUA)
        if failure is None:
            try:
                if len(part.data):
                    self.device.pwrite(part.data, part.offset, fua)
                if fua:
                    self.device.flush()  # the earlier parts too: FUA covers the whole write
            except Exception as exc:  # a device failure becomes an NBD error reply, as in carry_out
                failure = self._failed_writes[cookie] = exc
                if self.on_device_error is not None and not isinstance(exc, OSError):
                    self.on_device_error(part, exc)
        if not last:
            return None
        self._failed_writes.pop(cookie, None)
        if failure is not None:
            return error_reply_for(WriteRequest(cookie, part.offset, b""), failure)
        return SuccessReply(cookie)

    def refuse_shutting_down(self, request: Request) -> None:
        """Answer ``request`` with ESHUTDOWN: the server is shutting down and takes no new work."""
        self.engine.send(ErrorReply(request.cookie, Errno.ESHUTDOWN, _SHUTTING_DOWN))

    def flush_device(self) -> None:
        """Make the served device's writes durable (called as the connection ends); OSError is the caller's. A
        device without ``flush`` has nothing to make durable (capabilities_of offers no FLUSH for it)."""
        flush = getattr(self.device, "flush", None) if self.spec is not None else None
        if flush is not None:
            flush()

    def close(self) -> bool:
        """The connection is ending: give back every byte of the budget it held. True the first time only (the
        driver then sends what is queued, if the client takes it, and closes the stream)."""
        if self._closed:
            return False
        self._closed = True
        if self.share is not None:
            self.share.give_all()
        return True
