"""One connection of the blocking NBD server: a connected socket's I/O loop around
nbdproto.serving.ServerSessionLogic.

``ServerSession`` is one connection: ``negotiate()`` runs the handshake and returns the export name the client
chose, or ``nbdproto.ClientAborted``; ``serve(device)`` answers the choice and serves requests until the client
disconnects; the session is a context manager that guarantees the close. ``negotiate(sock, ...)`` is the
one-call form. ``Server`` (``_server``) runs one per connection, each in a thread of its own.

Every decision is nbdproto's (the engine, ServerSessionLogic, the shared budget and log); this module moves
bytes, bounds waits with socket timeouts, and chooses threads. Requests are carried out inline by the
connection's thread for devices whose ``dispatch`` is "inline" or "batch": it reads a large chunk, carries out
every request in it and writes the replies with one sendmsg. Devices that may be slow ("threads") get a pool
per connection, so requests overlap and replies go out as they complete (in any order, as the protocol
allows). On a plaintext connection a device's read views are queued as the replies' data, so a read costs no
system call of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nbdproto
import nbdproto.serving
import nbdproto.tls
from nbdproto.engine import HandshakeStep
from nbdproto.serving import (
    FINISHED,
    RECEIVE,
    RECEIVE_READY,
    BatchEnd,
    ServerSessionLogic,
    Step,
    WaitForBudget,
    Work,
    streamed_part,
)
from nbdproto.sockets import SharedTls, SocketStream, TlsChannel, client_info

from ._budget import SharedBudget, WaitingShare
from ._pipelined import pipelined_transmission

__all__ = [
    "ServerSession",
    "negotiate",
    "DEFAULT_WORKERS",
    "SharedBudget",
    "WaitingShare",
    "PEER_ERRORS",
    "default_log",
]

log = logging.getLogger("nbdproto.threads.server")

DEFAULT_WORKERS = 16
"""Threads per connection for devices that may be slow (``dispatch`` "threads"), as nbdkit's default pool."""

PEER_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, ssl.SSLError, TimeoutError, OSError)
"""How a socket says the client went away, broke the connection or stalled (ConnectionLog: the client's doing)."""


_NO_SETTINGS = nbdproto.serving.SessionSettings()
_TIMER_SLACK = 0.01
"""Seconds a receive timer may run out early by the clock we check it with (the kernel rounds it to ticks)."""


class ServerSession:
    """One client connection on the server side, over a connected blocking socket.

    ``settings``: what the server tells each session (nbdproto.serving.SessionSettings: the offer list, the export
    lookup, TLS, limits). ``workers``: threads carrying out requests for devices that may be slow (None:
    DEFAULT_WORKERS for devices whose dispatch is "threads", inline for the others; 0: always inline).
    ``poll``: seconds to spin, after sending replies, on receives that do not wait before sleeping until the
    client's next request (plaintext only; 0: never): a client that sends one request at a time is then served
    without a wake-up per request, at the price of a busy core while it spins.
    ``share``: its draw on the server's memory budget (a budget of its own otherwise); ``log``: the server's
    ConnectionLog; ``client``: what the server knows of the client (nbdproto.ClientInfo; from ``sock`` if not
    given), completed after a TLS upgrade.
    """

    def __init__(
        self,
        sock: socket.socket,
        settings: nbdproto.serving.SessionSettings = _NO_SETTINGS,
        *,
        workers: int | None = None,
        poll: float = 0.0,
        share: WaitingShare | None = None,
        log: nbdproto.serving.ConnectionLog | None = None,
        client: nbdproto.ClientInfo | None = None,
    ) -> None:
        self.stream = SocketStream(sock)
        self._share = share or WaitingShare(SharedBudget(settings.limits.memory_limit))
        self.logic = ServerSessionLogic(
            settings, share=self._share, client=client or client_info(sock), log=log or default_log()
        )
        self.engine = self.logic.engine
        self._workers = workers
        self._poll = poll
        self._timeout: float | None = None  # the socket's current timeout, changed only when it must
        self._timer: float | None = None  # the receive timer armed on a plaintext socket in transmission
        self._plain = False  # a plaintext socket (not TLS), known once transmission starts
        self._tls: TlsChannel | None = None  # a TLS connection's, while the session's thread alone uses it
        self._lock = threading.Lock()  # the engine, when a pool of threads carries requests out
        self._stopping = threading.Event()
        self._receiving = False  # blocked waiting for the client's bytes (idle then if logic.idle: safe to close)
        self._lone_reads = False  # _answer_lone_reads may serve a client's one request at a time
        self._started = time.monotonic()

    # --- The contract: negotiate, serve, close -------------------------------------------------------------

    def negotiate(self) -> str | nbdproto.ClientAborted:
        """Run the handshake until the client chooses an export; returns its name, or ClientAborted.

        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol,
        TimeoutError when it takes longer than the handshake limit.
        """
        while (step := self.logic.handshake_step()) is not HandshakeStep.DONE:
            self._handshake_deadline()
            self._start_tls() if step is HandshakeStep.START_TLS else self._exchange()
        return self.logic.outcome  # type: ignore[return-value]

    def serve(
        self, device: nbdproto.BlockDevice | nbdproto.ExportSpec[Any], *, read_only: bool = True, description: str = ""
    ) -> None:
        """Serve the chosen export from ``device`` until the client disconnects, then flush the device.

        Read-only unless ``read_only=False`` (an ExportSpec carries its own settings).
        """
        if not self.logic.offer_export(device, read_only=read_only, description=description) and not isinstance(
            self.negotiate(), str
        ):
            return
        self._set_timeout(None)
        self._plain = type(self.stream.sock) is socket.socket
        pooled = self._pooled()
        pipelined = not pooled and nbdproto.serving.submitting(self.logic.device)
        # Over TLS, the inline path receives through a TlsChannel: exactly the sizes asked for (not SharedTls).
        self.logic.write_in_place(kernel_receives=self._plain, exact_receives=not (self._plain or pooled or pipelined))
        timer = self.logic.shortest_wait
        self._timer = timer if timer is not None and self._plain and self.stream.arm_receive_timer(timer) else None
        try:
            if pipelined:
                pipelined_transmission(self)
            else:
                self._pooled_transmission() if pooled else self._inline_transmission()
        finally:
            self.logic.flush_device()  # a failure is logged there, in one line

    def close(self) -> None:
        """Close the connection (idempotent) and give back everything it held."""
        if self.logic.close():
            self._tls = None  # the goodbye below waits on the socket itself, for a moment
            with contextlib.suppress(OSError):
                self._set_timeout(1.0)  # a client that does not read is not waited for
                self._send()
            self.stream.close()

    def __enter__(self) -> ServerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Shutdown, from the server's thread ----------------------------------------------------------------

    def stop(self) -> None:
        """The server is shutting down: requests from now on get ESHUTDOWN, and the connection ends as soon
        as nothing is in flight (at once if it is idle now)."""
        self.logic.begin_shutdown()
        self._stopping.set()
        if self._receiving and self.logic.idle:  # read while the session's thread waits: nothing changes it
            with contextlib.suppress(OSError):
                self.stream.sock.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """End the connection now, whatever it is doing (the shutdown's grace period is over)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.stream.sock.shutdown(socket.SHUT_RDWR)

    # --- Bytes ----------------------------------------------------------------------------------------------

    def _send(self) -> None:
        pieces = self.engine.data_to_send()
        if pieces:
            if self._tls is not None:
                self._tls.send(pieces)  # type: ignore[arg-type]
            else:
                self.stream.send(pieces)
        self.logic.sent()

    def _exchange(self) -> None:
        self._send()
        self.engine.receive_data(self.stream.recv())

    def _receive(self, lock: threading.Lock | None = None) -> None:
        """Wait for the client's next bytes as long as the limits allow (ServerSessionLogic.next_wait) and hand
        them to the session logic (under ``lock``, the engine's when pool threads share it: held while handing
        over, never while waiting)."""
        hand, value = self._wait_for_bytes()
        if lock is None:
            hand(value)
        else:
            with lock:
                hand(value)

    def _wait_for_bytes(self) -> tuple[Callable[[Any], None], Any]:
        """Receive the client's next bytes: the rest of a write's payload straight into its own buffer, or with
        the header after it into ``in_place_buffers()``, anything else as bytes; returned with the logic's
        method that takes what arrived there (``wait_ran_out`` when the wait did). On a plaintext socket the
        armed receive timer bounds each wait (see ``serve``), else a Python timeout."""
        if self._tls is not None:
            return self._wait_for_tls(self._tls)
        logic, stream = self.logic, self.stream
        target = self.engine.write_buffer()
        buffers = logic.in_place_buffers() if self._plain else None
        wait = logic.next_wait()
        timed = wait is not None and (self._timer is None or wait < self._timer)
        self._set_timeout(wait if timed else None)
        size = logic.receive_size if self._plain else nbdproto.serving.RECV_SIZE
        if self._poll and not timed and self._plain and buffers is None:
            got = stream.poll(self._poll, target, size)
            if got is not None:
                return (logic.received if target is None else logic.received_into_payload), got
        if size > nbdproto.serving.RECV_SIZE and target is None:
            # A receive that waits holds its buffer while it waits: the large one only for bytes already here
            # (a receive that does not wait), so that a connection gone quiet holds RECV_SIZE, whatever it sent.
            data = None if timed else stream.recv_ready(size)
            if data is not None:
                return logic.received, data
            size = nbdproto.serving.RECV_SIZE
        started = time.monotonic() if wait is not None else 0.0
        self._receiving = True
        try:
            while True:
                try:
                    if buffers is not None:
                        return logic.received_in_place, stream.recv_into_buffers(buffers)
                    if target is not None:
                        return logic.received_into_payload, stream.recv_into(target)
                    return logic.received, stream.recv(size)
                except BlockingIOError:  # the armed timer ran out: the limit may not have
                    if wait is not None and time.monotonic() - started >= wait - _TIMER_SLACK:
                        return _ran_out(logic)
        except TimeoutError:
            return _ran_out(logic)
        finally:
            self._receiving = False

    def _wait_for_tls(self, tls: TlsChannel) -> tuple[Callable[[Any], None], Any]:
        """``_wait_for_bytes`` on a TLS connection: every record that has arrived, into the buffers the logic
        gives (the rest of a write's payload, and the header after it), else as bytes; a wait (bounded by the
        limits) only when nothing has arrived."""
        logic = self.logic
        buffers, hand = logic.in_place_buffers(), logic.received_in_place
        if buffers is None and (target := self.engine.write_buffer()) is not None:
            buffers, hand = [target], logic.received_into_payload
        self._receiving = True
        try:
            got = tls.receive_within(logic.next_wait(), buffers)
        finally:
            self._receiving = False
        return _ran_out(logic) if got is None else ((logic.received if buffers is None else hand), got)

    def _set_timeout(self, seconds: float | None) -> None:
        if seconds != self._timeout:
            self.stream.sock.settimeout(seconds)
            self._timeout = seconds

    def _handshake_deadline(self) -> None:
        limits = self.logic.settings.limits
        limit = limits.seconds(limits.handshake_timeout)
        if limit is not None:
            left = self._started + limit - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the handshake took longer than {limit} s")
            self._set_timeout(left)

    def _start_tls(self) -> None:
        self._send()
        sock = self.stream.sock = self.logic.settings.tls.wrap_socket(self.stream.sock, server_side=True)
        self.logic.tls_established(sock.getpeercert(), nbdproto.tls.psk_identity(sock))

    # --- Transmission ---------------------------------------------------------------------------------------

    def _pooled(self) -> bool:
        if self._workers is not None:
            return self._workers > 0
        return self.logic.dispatch() == "threads"

    def _read_view(self) -> nbdproto.ReadView | None:
        return self.logic.read_view(kernel_sends=not isinstance(self.stream.sock, ssl.SSLSocket))

    def _inline_transmission(self) -> None:
        # Read a chunk, carry out every request in it, write every reply with one sendmsg.
        logic = self.logic
        if not self._plain:
            self._tls = TlsChannel(self.stream.sock)  # type: ignore[arg-type]
            self._timeout = 0.0  # what the channel set: a close sets its own
            logic.reuse_read_buffers()  # its sends copy (encrypt) the data: the buffers are free once sent
        steps = logic.inline_transmission(self._read_view())
        self._lone_reads = self._plain and not self._poll  # (busy polling spins in _wait_for_bytes instead)
        found: int | None = None
        while (step := steps.send(found)) is not FINISHED:
            found = self._take_step(step)
        self._send()

    def _take_step(self, step: Step) -> int | None:
        """One step of inline_transmission: RECEIVE_READY receives what has arrived, into place, without waiting
        (its count; None when nothing had); every other step sends what is queued, then receives or waits for
        the budget as it says."""
        if step is RECEIVE_READY:
            if self._tls is not None:
                buffers = self.logic.in_place_buffers()
                return None if buffers is None else self._tls.receive_into(buffers)
            # Not on a socket with a Python timeout, whose every receive first waits for bytes to come.
            buffers = self.logic.in_place_buffers() if self._timeout is None else None
            return None if buffers is None else self.stream.recv_into_buffers(buffers, wait=False)
        self._send()
        if step is RECEIVE:
            if not (self._lone_reads and self.logic.lone_reads_wanted and self._answer_lone_reads()):
                self._receive()
        elif type(step) is WaitForBudget:
            self._share.take(step.amount, self._stopping)
        return None

    def _answer_lone_reads(self) -> bool:
        """At a RECEIVE step where the logic wants it (ServerSessionLogic.lone_reads_wanted): receive, and while
        what arrives is a lone read, answered at once (ServerSessionLogic.answer_lone_read), send its reply and
        receive again. True once bytes the steps must take from here were received (handed to the logic
        already); False when the server began shutting down first (the steps' receive waits as the limits say).

        A client that sends one request at a time (fio QD1) is served by this short loop: one receive, a few
        calls into the logic and one send a request, where a turn of ``_take_step`` costs a step, the limits
        worked out again and a receive sized anew for every request."""
        logic, stream = self.logic, self.stream
        answer = logic.answer_lone_read
        recv, send = stream.sock.recv, stream.send  # (a plaintext socket's own receive: SocketStream.recv's)
        self._set_timeout(None)  # no limit applies (next_wait): only the armed timer's wake-ups, waited out
        while not logic.shutting_down:
            self._receiving = True
            try:
                data = recv(nbdproto.serving.RECV_SIZE)
            except BlockingIOError:  # the armed receive timer ran out (see serve): no limit did
                continue
            except ConnectionResetError:  # as SocketStream.recv: the client is gone
                data = b""
            finally:
                self._receiving = False
            pieces = answer(data)
            if pieces is None:
                return True
            send(pieces)  # (no sent(): these replies hold nothing the logic counts)
        return False

    def _pooled_transmission(self) -> None:
        # Requests go to a pool and replies go out as they complete. The budgets stop the reader while too
        # much is in flight, so the pool's queue (and the memory its requests pin) stays bounded. Replies leave
        # under a send lock of their own, not the engine's (send_replies): a client slow to read them holds up
        # the threads with replies to send, and the reader only when it has replies of its own to send. On TLS
        # the connection is shared through SharedTls (OpenSSL must not read it in one thread while another
        # writes it).
        logic, lock, read_view, share, engine = self.logic, self._lock, self._read_view(), self._share, self.engine
        workers = self._workers or DEFAULT_WORKERS
        limits = logic.settings.limits
        budget = nbdproto.serving.RequestBudget(max(workers, limits.max_requests), limits.memory_limit)
        room = threading.Condition(lock)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="nbd-request")
        tls = None if self._plain else SharedTls(self.stream.sock)  # type: ignore[arg-type]
        send_lock = threading.Lock()

        def send_replies() -> None:
            with send_lock:
                with lock:
                    pieces = engine.data_to_send()
                    logic.sent()
                if not pieces:
                    return
                if tls is None:
                    self.stream.send(pieces)
                else:
                    tls.send(pieces)  # type: ignore[arg-type]

        def carry_out(request: Any, cost: int) -> None:
            reply = logic.carry_out_one(request, read_view)
            with lock:
                engine.send(reply)
            try:
                with contextlib.suppress(OSError):  # a dead socket is the reader's to notice: it ends the session
                    send_replies()
            finally:
                # Only once its reply is out (this thread's send, or one before it): what a client that does
                # not read holds stays within the budgets.
                with lock:
                    budget.done(cost)
                    room.notify_all()
                share.give(cost)

        batch: list[Work] = []
        try:
            while True:
                with lock:
                    end = logic.next_batch(batch)
                for request in batch:
                    if streamed_part(request):
                        # The parts of a streamed write are carried out in order, by the reader.
                        reply = logic.carry_out_part(request)
                        with lock:
                            if reply is not None:
                                engine.send(reply)
                        continue
                    cost = nbdproto.serving.request_cost(request)
                    with lock:
                        while budget.full:
                            room.wait()
                    share.take(cost, self._stopping)
                    with lock:
                        budget.add(cost)
                    pool.submit(contextvars.copy_context().run, carry_out, request, cost)
                batch.clear()
                if end is not BatchEnd.NEED_DATA:
                    with lock:  # ending, or DISC with replies owed: first let what is in flight finish
                        while not budget.idle:
                            room.wait()
                send_replies()
                if end is BatchEnd.CLOSED:
                    return
                if end is BatchEnd.NEED_DATA:
                    if tls is None:
                        self._receive(lock)
                    else:
                        self._receive_shared(tls, lock)
        finally:
            pool.shutdown(wait=True)
            if tls is not None:
                tls.release()

    def _receive_shared(self, tls: SharedTls, lock: threading.Lock) -> None:
        """``_receive`` for a TLS connection whose replies pool threads send (SharedTls: OpenSSL must not read a
        connection in one thread while another writes it), the wait bounded by the limits as there."""
        logic = self.logic
        target = self.engine.write_buffer()
        self._receiving = True
        try:
            got = tls.receive(target, nbdproto.serving.RECV_SIZE, logic.next_wait())
        finally:
            self._receiving = False
        with lock:
            if got is None:
                logic.wait_ran_out()
            elif target is not None:
                logic.received_into_payload(got)  # type: ignore[arg-type]
            else:
                logic.received(got)  # type: ignore[arg-type]


def _ran_out(logic: ServerSessionLogic) -> tuple[Callable[[Any], None], Any]:
    return (lambda _: logic.wait_ran_out()), None


def negotiate(
    sock: socket.socket,
    exports: Iterable[str | nbdproto.ExportListing] | None = None,
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[ServerSession, str | nbdproto.ClientAborted]:
    """The one-call handshake: negotiate on an accepted socket with an optional offer list.

    Returns the session (a context manager that guarantees the close) and the export name the client chose,
    or ``ClientAborted``. TLS is forced when ``tls`` is given. Then call ``session.serve(device)``.
    """
    offer = None if exports is None else list(exports)
    session = ServerSession(sock, nbdproto.serving.SessionSettings(offer, tls=tls))
    try:
        return session, session.negotiate()
    except BaseException:
        session.close()
        raise


def default_log() -> nbdproto.serving.ConnectionLog:
    return nbdproto.serving.ConnectionLog(log, time.monotonic, PEER_ERRORS)
