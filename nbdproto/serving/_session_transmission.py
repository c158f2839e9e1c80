"""The transmission half of a server session's logic: receives, waits, batches of requests, carrying them out.

``ServerSessionLogic`` (``_session``) is assembled from its handshake half there and this; see ``_steps`` for the
steps a driver follows. What the driver tells the logic after a receive says where the bytes went, one method
each: ``received`` (bytes), ``received_into_payload`` (a count, into ``engine.write_buffer()``),
``received_in_place`` (a count, into ``in_place_buffers()``), or ``wait_ran_out``.
"""

from __future__ import annotations

import errno
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

from nbdproto.engine import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    DisconnectRequest,
    ErrorReply,
    Event,
    ReadRequest,
    Request,
    ServerConnection,
    SuccessReply,
    WritePayload,
    WriteRequest,
)
from nbdproto.wire import CommandFlags, Errno, LocalProtocolError

from ._budget import MemoryShare
from ._carry_out import OnError, ReadView, carry_out, carry_out_all, error_reply_for, read_view_of, write_view_of
from ._device import BlockDevice
from ._limits import ServerLimits
from ._receive_size import RECV_SIZE, ReceiveSize
from ._reply_buffers import ReplyBuffers
from ._session_pipelining import SHUTTING_DOWN, SessionPipelining, written_already
from ._steps import (
    FINISHED,
    FLUSH_AT,
    READY_IN_A_ROW,
    RECEIVE,
    RECEIVE_READY,
    SEND,
    BatchEnd,
    Step,
    WaitForBudget,
    Work,
    streamed_part,
)

__all__ = ["SessionTransmission", "SHUTTING_DOWN"]

_SHUTDOWN_DRAIN = 0.05  # seconds a shutting-down session waits for requests already on their way


class SessionTransmission(SessionPipelining):
    """Receives and requests for ServerSessionLogic (which sets every attribute below up); the pipelined
    half, and what both halves share, in ``_session_pipelining``."""

    engine: ServerConnection
    share: MemoryShare | None
    on_device_error: OnError | None
    shutting_down: bool
    _limits: ServerLimits
    _queued: int
    _queued_cost: int
    _failed_writes: dict[int, BaseException]
    _streamed_flags: dict[int, CommandFlags]
    _receive_size: ReceiveSize
    _reply_buffers: ReplyBuffers | None
    _header_room: memoryview
    _handed_writes: list[WriteRequest]
    _lone_reads: tuple[BlockDevice, Mapping[int, str], ReadView] | None
    _request_wait: float | None  # the limits as waits (ServerLimits.seconds), worked out once
    _idle_wait: float | None

    # --- Where bytes go -------------------------------------------------------------------------------------

    def write_in_place(self, *, kernel_receives: bool, exact_receives: bool = False) -> None:
        """Receive write payloads straight into the device's storage from now on, where it offers that (its
        ``write_view``, nbdproto.WriteView) and only the kernel writes there: when the driver receives with
        ``recv_into`` on a plaintext socket (``kernel_receives``). A file truncated under the server then fails
        the receive with EFAULT, where user-space code (TLS) writing into its mapping would die of SIGBUS.

        ``exact_receives``: the driver's receives bring exactly the bytes ``in_place_buffers()`` asks for and
        no more, however the client sent them (TLS: OpenSSL keeps the rest of a decrypted record for the next
        receive, nbdproto.sockets.TlsChannel). Streaming big writes are then received as on a plaintext socket
        in place: the rest of a payload into the write's own buffer and the header after it, in one receive,
        instead of a receive (and a turn of the driver's loop) for every TLS record."""
        write_view = write_view_of(self.device) if kernel_receives else None
        if write_view is not None:
            self.engine.write_view = write_view
        if write_view is not None or exact_receives:
            self._receive_size.in_place(self.engine.request_header_size)
            self._header_room = self._header_room[: self.engine.request_header_size]  # (fixed in transmission)

    def read_view(self, *, kernel_sends: bool) -> ReadView | None:
        """The device's zero-copy read views, where they may be used: only when the driver hands buffers to
        the kernel as they are (a plaintext socket's sendmsg). User-space code (TLS) must not read them: a file
        truncated under the server is a SIGBUS there, where sendmsg merely fails with EFAULT."""
        return read_view_of(self.device) if kernel_sends else None

    def reuse_read_buffers(self) -> None:
        """Read the data of replies answered without a device view into buffers used again once sent
        (nbdproto.serving's ReplyBuffers) from now on, in ``inline_transmission``: for a driver whose sends copy
        the data anyway (TLS encrypts it), where a new buffer per read costs page faults and zeroing. The
        driver must have sent every reply when it calls ``sent()``, as always."""
        self._reply_buffers = ReplyBuffers(share=self.share)

    @property
    def receive_size(self) -> int:
        """How many bytes to ask of the next receive that is not into ``engine.write_buffer()``
        (nbdproto.serving.ReceiveSize: more while the client streams big writes). A driver whose receives bring
        at most a TLS record (16 KiB) asks for RECV_SIZE instead: asking for more only costs it memory."""
        return self._receive_size.next

    def in_place_buffers(self) -> list[memoryview] | None:
        """While big writes stream in place (``write_in_place``): the buffers for the next receive, which
        brings the rest of the arriving payload, into place, and the request header after it, with one
        ``recvmsg_into`` (the header alone when no payload is arriving); hand the count to
        ``received_in_place`` (or, at RECEIVE_READY, send it back into the steps). None otherwise: receive as
        ``receive_size`` and ``engine.write_buffer()`` say. Without it a write took two receives: its header's,
        and its payload's."""
        if not self._receive_size.streaming_in_place:
            return None
        header = self._header_room  # a request header's size, from write_in_place on
        target = self.engine.write_buffer()
        return [header] if target is None else [target, header]

    def received(self, data: bytes | bytearray | memoryview) -> None:
        """The driver received ``data`` (b"": the client closed)."""
        self.engine.receive_data(data)
        self._receive_size.received(len(data), False)

    def answer_lone_read(self, data: bytes | bytearray | memoryview) -> list[Any] | None:
        """``received(data)``, on the one-request road (``lone_reads_wanted``): when ``data`` is one read and
        nothing else is owed (a client that sends one request at a time), the read is carried out now and its
        reply returned, as pieces to send (as ``engine.data_to_send()`` gives them), and the driver receives
        again, the steps still at their RECEIVE. None: go on with the steps, which take it from here. These
        replies hold no budget and no kept buffer (the road is only taken with read views, which take neither),
        so the driver need not call ``sent()`` after sending them: a call less a request.

        For reads answered with the device's views (where ``inline_transmission`` was given them): the reply's
        header and the view, in a few calls, where the steps cost a turn of the generator, a batch, two passes
        of the engine and its queue for each request: what serving fio QD1 cost (ServerConnection's
        ``receive_lone_read`` and ``answer_lone_read``). A read the view does not answer goes as the steps
        would carry it out (``carry_out``)."""
        lone_reads = self._lone_reads
        if lone_reads is None or self.shutting_down:
            self.received(data)
            return None
        engine, receive_size = self.engine, self._receive_size
        read = engine.receive_lone_read(data)
        if receive_size.next != RECV_SIZE:  # (not streaming: a receive of the stream's bytes changes nothing)
            receive_size.received(len(data), False)
        if read is None:
            return None
        device, contexts, reader = lone_reads
        view_of: ReadView | None = reader
        try:
            view = reader(read.offset, read.length)
        except Exception:  # the device's failure: carry_out asks again, and answers (and logs) it
            view = None
        else:
            if view is not None:
                return [engine.answer_lone_read(read), view]
            view_of = None  # no view for this read: carry_out reads it without asking for one again
        engine.send(carry_out(device, read, contexts, self.on_device_error, view_of))
        return engine.data_to_send()

    @property
    def lone_reads_wanted(self) -> bool:
        """Whether a driver at a RECEIVE step of ``inline_transmission`` may serve a client one request at a
        time as a short loop: receive ``RECV_SIZE`` bytes without a limit on the wait, hand them to
        ``answer_lone_read``, send what it returns, and again while it returns something and the server is not
        shutting down. So it is while the steps were given read views, nothing is owed or arriving, no limit
        applies between requests, and writes are not streaming in (then receives are sized and placed as
        ``receive_size`` and ``in_place_buffers`` say)."""
        return self._lone_reads is not None and self._receive_size.next == RECV_SIZE and self.next_wait() is None

    def received_into_payload(self, count: int) -> None:
        """The driver received ``count`` bytes straight into ``engine.write_buffer()`` (0: the client closed)."""
        engine = self.engine
        self._receive_size.received(count, True, engine.arriving_write_size)
        engine.received_into(count)

    def received_in_place(self, count: int) -> None:
        """The driver received ``count`` bytes into the buffers ``in_place_buffers()`` gave (0: the client
        closed): the part in the payload's place, then the header bytes after it. A write whose payload they
        complete, followed by a whole header, is handed over by the engine at once (its ``received_in_place``,
        for a client streaming big writes: a call where ``next_requests`` took several), and ``next_batch``
        puts it first."""
        engine, receive_size = self.engine, self._receive_size
        target = engine.write_buffer()
        into_target = 0 if target is None else min(count, len(target))
        write_size = engine.arriving_write_size if into_target else 0
        handed = engine.received_in_place(count, self._header_room)
        if handed is not None:
            self._handed_writes.append(handed)
            receive_size.received_payload_and_header(write_size)
            return
        if into_target:
            receive_size.received(into_target, True, write_size)
        if count > into_target or not count:
            receive_size.received(count - into_target, False)

    # --- How long to wait -------------------------------------------------------------------------------------

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
        down (to take what already arrived: it gets ESHUTDOWN). When the wait runs out, ``wait_ran_out``."""
        engine = self.engine
        if engine.receiving_request:
            return self._request_wait
        if self.shutting_down:
            return _SHUTDOWN_DRAIN
        if engine.in_flight:
            return None
        return self._idle_wait

    @property
    def shortest_wait(self) -> float | None:
        """The shortest of the limits ``next_wait`` gives in transmission, shutting down aside (None: there is
        no limit): a timer of this length may stay armed on every receive (a socket's SO_RCVTIMEO, set once);
        when it runs out before ``next_wait`` has, the driver simply waits again."""
        limits = self._limits
        waits = [w for w in (limits.seconds(limits.request_timeout), limits.seconds(limits.idle_timeout)) if w]
        return min(waits, default=None)

    def wait_ran_out(self) -> None:
        """The wait ``next_wait`` allowed ran out: TimeoutError for a request stalled part-way; otherwise (idle
        too long, or shutting down) the end of the connection, as if the client had closed it."""
        if self.engine.receiving_request:
            limit = self._limits.request_timeout
            raise TimeoutError(f"the rest of a request did not arrive within {limit} s")
        self.received(b"")

    # --- Requests ---------------------------------------------------------------------------------------------

    def next_batch(self, batch: list[Work]) -> BatchEnd:
        """Move every request the received bytes hold into ``batch`` (in order), and say what ended it.

        NBD_CMD_DISC is noted and not returned (the engine answers nothing to it, and stops reading). Parts of
        a streamed write (WritePayload) are work too, carried out like requests.
        """
        handed, engine = self._handed_writes, self.engine
        if handed:  # received_in_place's: they came before anything the engine holds
            batch.extend(handed)
            handed.clear()
            if engine.write_buffer() is not None:  # the next write's payload is arriving: nothing else has
                return BatchEnd.NEED_DATA
        next_requests = engine.next_requests
        while True:
            event = next_requests(batch)  # type: ignore[arg-type]
            if event is NEED_DATA:
                return BatchEnd.NEED_DATA
            elif event is PAUSED:
                return BatchEnd.PAUSED
            elif type(event) is ConnectionClosed:
                return BatchEnd.CLOSED
            elif type(event) is not DisconnectRequest:
                raise LocalProtocolError(f"unexpected {event!r} in transmission")

    def inline_transmission(self, read_view: ReadView | None) -> Generator[Step, int | None, None]:
        """The whole of transmission for a driver that carries requests out where it reads them, as steps
        (nbdproto.serving's ``_steps`` says what each asks). It ends with FINISHED: everything owed is sent.

        Each batch of requests read is carried out here and now, in order, its replies queued, and replies are
        made only as they can be sent: no more than FLUSH_AT bytes of them are queued at a time (SEND), and no
        more than the budget share allows (WaitForBudget)."""
        batch: list[Work] = []
        ready = 0  # RECEIVE_READY steps in a row that found bytes, since replies were last sent
        engine, device, share = self.engine, self.device, self.share
        batched = hasattr(device, "call_batch")
        # Reads without views fill reused buffers where the driver asked for them; the budget counts them still.
        reader, kept = read_view, None
        if reader is None and self._reply_buffers is not None:
            kept = self._reply_buffers
            reader = kept.reader(device)
        # answer_lone_read's road: reads that take no budget (views) on a device called here (not batched).
        contexts = engine.meta_contexts  # (agreed before transmission: fixed from here on)
        self._lone_reads = None if batched or read_view is None else (device, contexts, read_view)
        while True:
            end = self.next_batch(batch)
            if batched and batch:
                yield from self._carry_out_batched(batch)
                batch.clear()
            on_error, shutting_down = self.on_device_error, self.shutting_down
            # Queued reply bytes: the driver's sent() sets them to 0 at every step but RECEIVE_READY (a driver sends
            # what is queued first), so they are read back after each step, and written back before RECEIVE_READY.
            queued = self._queued
            for request in batch:
                if type(request) is ReadRequest:  # the commonest, first (a read is never part of a streamed write)
                    if shutting_down:
                        self.refuse_shutting_down(request)
                        continue
                    length = request.length
                    if read_view is None and share is not None:
                        # A kept buffer of its length comes with the share it holds: the read's budget.
                        if (kept is None or not kept.hand_over(length)) and not (
                            share.try_take(length) or self._take_kept_back(length)
                        ):
                            yield WaitForBudget(length)
                            queued, shutting_down = self._queued, self.shutting_down
                        self._queued_cost += length
                    engine.send(carry_out(device, request, contexts, on_error, reader))
                    queued += length
                    if queued >= FLUSH_AT:
                        yield SEND
                        queued, shutting_down = self._queued, self.shutting_down
                    continue
                if type(request) is WriteRequest and not (request.more or shutting_down):
                    # The next commonest, a whole write: as the last branch below, without telling it apart.
                    engine.send(carry_out(device, request, contexts, on_error, read_view))
                    continue
                streamed = streamed_part(request)
                if shutting_down and not streamed and not written_already(request):
                    self.refuse_shutting_down(request)  # type: ignore[arg-type]
                elif streamed:
                    reply = self.carry_out_part(request)  # type: ignore[arg-type]
                    if reply is not None:
                        engine.send(reply)
                else:
                    engine.send(carry_out(device, request, contexts, on_error, read_view))  # type: ignore[arg-type]
            self._queued = queued
            batch.clear()
            if end is BatchEnd.CLOSED:
                self._lone_reads = None
                yield FINISHED
                return
            if end is BatchEnd.NEED_DATA and self._receive_size.streaming_in_place and ready < READY_IN_A_ROW:
                found = yield RECEIVE_READY
                if found is not None:
                    self.received_in_place(found)
                    ready += 1
                    continue
            ready = 0
            # PAUSED (a request waiting for its cookie to come free, or DISC): the batch answered it all.
            yield RECEIVE if end is BatchEnd.NEED_DATA else SEND

    def _carry_out_batched(self, batch: Iterable[Work]) -> Iterator[Step]:
        """inline_transmission's carrying out for a device that takes many calls at once (``call_batch``: a
        remote device keeps them all in flight together): each run of plain requests goes to it in one call."""
        engine, share = self.engine, self.share
        run: list[Request] = []
        for request in (*batch, None):
            streamed = request is not None and streamed_part(request)
            if request is not None and not streamed and not (self.shutting_down and not written_already(request)):
                run.append(request)  # type: ignore[arg-type]
                continue
            if run:
                cost = sum(r.length for r in run if type(r) is ReadRequest)
                if share is not None and not share.try_take(cost):
                    yield WaitForBudget(cost)
                self._queued_cost += cost
                for reply in carry_out_all(self.device, run, engine.meta_contexts, self.on_device_error):
                    engine.send(reply)
                self._queued += cost
                run = []
                if self._queued >= FLUSH_AT:
                    yield SEND
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
        if self._reply_buffers is not None:
            self._reply_buffers.sent()
        self._queued = self._queued_cost = 0

    def carry_out_one(self, request: Request, read_view: ReadView | None) -> Event:
        """Carry out one request (not part of a streamed write) and return its reply: for drivers that carry
        out requests concurrently, each in a thread or task of its own."""
        if self.shutting_down and not written_already(request):
            return ErrorReply(request.cookie, Errno.ESHUTDOWN, SHUTTING_DOWN)
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
                failure = self._failed_writes[cookie] = OSError(errno.ESHUTDOWN, SHUTTING_DOWN)
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
                if self.on_device_error is not None:
                    self.on_device_error(part, exc)
        if not last:
            return None
        self._failed_writes.pop(cookie, None)
        if failure is not None:
            return error_reply_for(WriteRequest(cookie, part.offset, b""), failure)
        return SuccessReply(cookie)
