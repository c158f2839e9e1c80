"""The async NBD server on anyio (asyncio or trio): an anyio byte stream's I/O loop around
ServerSessionLogic, and a Server.

- ``ServerSession``: one connection. ``await negotiate()`` returns the chosen export name or
  ``nbdproto.ClientAborted``; ``await serve(device)`` serves until the client disconnects; ``async with``
  guarantees the close.
- ``Server``: listens on TCP or a unix socket, maps names to devices (or asks a resolver), and serves every
  connection in its own task until ``shutdown()`` (graceful) or cancellation.

Devices are the synchronous ``nbdproto.BlockDevice`` both servers serve; their ``dispatch`` says how they are
called: "inline" on the event loop itself (memory, files on tmpfs: microseconds, never blocking), "batch"
(every request read in one go carried out together in one worker thread, in order), "threads" (a worker thread
per request, so slow requests overlap and replies go out as they complete). Every decision is nbdproto's; this
module moves bytes, bounds waits with cancel scopes, and chooses where device calls run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.tls import TLSAttribute, TLSStream

import nbdproto
import nbdproto.serving
import nbdproto.tls
from nbdproto.engine import HandshakeStep
from nbdproto.serving import (
    FINISHED,
    RECEIVE,
    RECEIVE_READY,
    RECV_SIZE,
    BatchEnd,
    ServerSessionLogic,
    WaitForBudget,
    streamed_part,
)
from nbdproto.sockets import AcceptBackoff, client_info, listen_socket

from ._budget import SharedBudget, WaitingRequests, WaitingShare
from ._pipelined import pipelined_transmission
from ._socket import RawSocketStream, SocketAcceptor, close_stream, receive, receive_ready, send_pieces
from ._tls import TlsSocketStream

__all__ = ["ServerSession", "Server", "listen"]

log = logging.getLogger("nbdproto.anyio.server")

PEER_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    ssl.SSLError,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
)
"""How a stream says the client went away, broke the connection or stalled (the client's doing)."""

_STREAM_GONE = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


_NO_SETTINGS = nbdproto.serving.SessionSettings()


class ServerSession:
    """One client connection on the server side, over an anyio byte stream (``listen()``'s fast
    RawSocketStream, or any other). ``settings``, ``log`` and ``client`` as for nbdproto_threads.ServerSession;
    ``budget``: the server's memory budget (a budget of its own otherwise)."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        settings: nbdproto.serving.SessionSettings = _NO_SETTINGS,
        *,
        budget: SharedBudget | None = None,
        log: nbdproto.serving.ConnectionLog | None = None,
        client: nbdproto.ClientInfo | None = None,
    ) -> None:
        self.stream: anyio.abc.ByteStream = stream
        self._share = WaitingShare(budget or SharedBudget(settings.limits.memory_limit))
        self.logic = ServerSessionLogic(
            settings, share=self._share, client=client or _client_of(stream), log=log or _default_log()
        )
        self.engine = self.logic.engine
        self._idle = False
        self._send_lock = anyio.Lock(fast_acquire=True)  # no extra trip through the loop when it is free
        # Whether request tasks send replies alongside the connection's own task. Until they do, sending
        # needs no lock (on asyncio each acquire and release asks for the current task, a getpid() call).
        self._shared_sending = False
        self._lone_reads = False  # _answer_lone_reads may serve a client's one request at a time

    async def negotiate(self) -> str | nbdproto.ClientAborted:
        """Run the handshake until the client chooses an export; its name, or ClientAborted.

        Raises ConnectionError when the client goes away, RemoteProtocolError when it breaks the protocol,
        TimeoutError when it takes longer than the handshake limit (the TLS handshake included).
        """
        limits = self.logic.settings.limits
        with anyio.fail_after(limits.seconds(limits.handshake_timeout)):
            while (step := self.logic.handshake_step()) is not HandshakeStep.DONE:
                await (self._start_tls() if step is HandshakeStep.START_TLS else self._exchange())
        return self.logic.outcome  # type: ignore[return-value]

    async def serve(
        self, device: nbdproto.BlockDevice | nbdproto.ExportSpec[Any], *, read_only: bool = True, description: str = ""
    ) -> None:
        """Serve the chosen export from ``device`` until the client disconnects, then flush the device."""
        if not self.logic.offer_export(device, read_only=read_only, description=description) and not isinstance(
            await self.negotiate(), str
        ):
            return
        # Write payloads into the device's storage only where the kernel alone writes there (our raw socket's
        # recv_into, not TLS). Our TLS stream receives exactly what it is asked for, a payload at a time.
        dispatch = self.logic.dispatch()
        pipelined = dispatch != "threads" and nbdproto.serving.submitting(self.logic.device)
        self.logic.write_in_place(
            kernel_receives=isinstance(self.stream, RawSocketStream),
            exact_receives=isinstance(self.stream, TlsSocketStream) and dispatch != "threads" and not pipelined,
        )
        try:
            if pipelined:  # many requests in flight on the device, answered as they complete
                limits = self.logic.settings.limits
                budget = nbdproto.serving.RequestBudget(limits.max_requests, limits.memory_limit)
                await pipelined_transmission(self, WaitingRequests(budget))
            elif dispatch == "threads":
                await self._concurrent_transmission()
            else:
                await self._batch_transmission(inline=dispatch == "inline")
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.logic.flush_device)  # a failure is logged there, in one line

    async def aclose(self) -> None:
        """Close the connection (idempotent) and give back everything it held."""
        if self.logic.close():
            with anyio.move_on_after(1.0), contextlib.suppress(*_STREAM_GONE):
                await self._send()  # a client that does not read is not waited for
            await close_stream(self.stream)

    async def __aenter__(self) -> ServerSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    def stop(self) -> None:
        """The server is shutting down (called from its task): requests from now on get ESHUTDOWN, and the
        connection ends as soon as nothing is in flight (at once if it is idle now)."""
        self.logic.begin_shutdown()
        raw = self.stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if self._idle and raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RD)  # wakes the waiting receive with the end of the stream

    # --- Bytes ----------------------------------------------------------------------------------------------

    async def _send(self) -> None:
        pieces = self.engine.data_to_send()
        if pieces:
            if self._shared_sending:
                async with self._send_lock:
                    await send_pieces(self.stream, pieces)
            else:
                await send_pieces(self.stream, pieces)
        self.logic.sent()

    async def _exchange(self) -> None:
        await self._send()
        self.engine.receive_data(await receive(self.stream))

    async def _receive(self, lock: threading.Lock | None = None) -> None:
        """Wait for the client's next bytes as long as the limits allow (ServerSessionLogic.next_wait) and hand
        them to the session logic: the rest of a write's payload straight into its own buffer where the stream
        allows it, or with the header after it into ``in_place_buffers()``, anything else as bytes. ``lock``:
        the engine's, where other threads share it (held while handing over, never while waiting)."""
        logic, held = self.logic, contextlib.nullcontext() if lock is None else lock
        with held:
            wait = logic.next_wait()
            hand, receiving, ready = self._receiving()
            self._idle = logic.idle
        if lock is not None:
            hand = functools.partial(_holding, lock, hand)
        try:
            if wait is None:
                hand(await receiving())
                return
            if ready is not None and (got := await ready()) is not None:
                hand(got)  # bytes had arrived: a receive that does not wait needs no time limit armed
                return
            with anyio.move_on_after(wait):
                hand(await receiving())
                return
        finally:
            self._idle = False
        with held:
            logic.wait_ran_out()

    async def _answer_lone_reads(self) -> bool:
        """At a RECEIVE step where the logic wants it (ServerSessionLogic.lone_reads_wanted): receive, and while
        what arrives is a lone read, answered at once (ServerSessionLogic.answer_lone_read), send its reply and
        receive again. True once bytes the steps must take from here were received (handed to the logic
        already); False when the server began shutting down first (the steps' receive waits as the limits say).

        A client that sends one request at a time (fio QD1) is served by this short loop, where a turn of
        ``_take_step`` costs a step, the limits worked out again and the receive chosen anew every request. It
        calls the socket itself, as RawSocketStream's receive and send would, without the three coroutines a
        receive goes through there and the one a send does: each is a frame made and unwound a request. On
        asyncio the loop's own callback for the readable socket receives, answers and sends
        (``Readable.serve``): the task wakes only when the steps take over, a send must wait, or the server
        shuts down. No ``sent()`` (see answer_lone_read)."""
        logic, stream = self.logic, self.stream
        assert isinstance(stream, RawSocketStream)
        answer, recv, send_now = logic.answer_lone_read, stream.sock.recv, stream.send_now
        handed_over = False  # bytes the steps must take were received (and handed to the logic)
        rest: Sequence[Any] | None = None  # what a send left, to send waiting

        def serve_one() -> bool:
            """Receive what arrived, answer and send it; True when the task must go on."""
            nonlocal handed_over, rest
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:  # a readiness seen before this request's bytes were taken: none yet
                return False
            except OSError:  # reset or broken: the end of the stream, as receive() gives it
                data = b""
            pieces = answer(data)
            if pieces is None:
                handed_over = True
                return True
            rest = send_now(pieces)
            return rest is not None or logic.shutting_down

        while not logic.shutting_down:
            if not serve_one():  # (bytes that arrived already: a client that sends more than one at a time)
                self._idle = True
                try:
                    await stream.readable.serve(serve_one)
                finally:
                    self._idle = False
            if handed_over:
                return True
            if rest is not None:
                await stream.send_pieces(rest)
                rest = None
        return False

    def _receiving(
        self,
    ) -> tuple[Callable[[Any], None], Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]] | None]:
        """The logic's method that takes what a receive brings, the receive ``_receive`` waits for, and on our
        own streams the same receive of what has arrived already (None when nothing has; None on others)."""
        logic, stream = self.logic, self.stream
        if not isinstance(stream, (RawSocketStream, TlsSocketStream)):
            # another stream (TLS: a receive brings a record, 16 KiB at most)
            return logic.received, functools.partial(receive, stream), None
        if (buffers := logic.in_place_buffers()) is not None:
            return (
                logic.received_in_place,
                functools.partial(stream.receive_into_buffers, buffers),
                functools.partial(stream.receive_ready_into_buffers, buffers),
            )
        target = self.engine.write_buffer()  # (after in_place_buffers, which looks at it itself)
        if target is None:
            size = logic.receive_size
            return (
                logic.received,
                functools.partial(receive, stream, size),
                functools.partial(receive_ready, stream, size),
            )
        return (
            logic.received_into_payload,
            functools.partial(stream.receive_into, target),
            functools.partial(stream.receive_ready_into, target),
        )

    async def _start_tls(self) -> None:
        await self._send()
        naming = nbdproto.tls.handshake_peer.set(f"client {self.logic.client}")
        try:
            if isinstance(self.stream, RawSocketStream):
                self.stream = await TlsSocketStream.wrap(self.stream, self.logic.settings.tls)
            else:
                self.stream = await TLSStream.wrap(
                    self.stream, server_side=True, ssl_context=self.logic.settings.tls, standard_compatible=False
                )
        finally:
            nbdproto.tls.handshake_peer.reset(naming)
        certificate = self.stream.extra(TLSAttribute.peer_certificate, None)
        self.logic.tls_established(certificate, nbdproto.tls.psk_identity(self.stream))

    # --- Transmission ---------------------------------------------------------------------------------------

    async def _batch_transmission(self, *, inline: bool) -> None:
        # Read a chunk, carry out every request in it (on the loop, or in one worker thread), send the replies.
        # Views only where the kernel alone reads them (our raw socket's sendmsg, not TLS) and they never wait
        # on a disk: a device called on the loop.
        logic = self.logic
        read_view = logic.read_view(kernel_sends=inline and isinstance(self.stream, RawSocketStream))
        if isinstance(self.stream, TlsSocketStream):
            logic.reuse_read_buffers()  # its sends copy (encrypt) the data: the buffers are free once sent
        steps = logic.inline_transmission(read_view)
        self._lone_reads = inline and isinstance(self.stream, RawSocketStream)
        found: int | None = None
        while True:
            step = steps.send(found) if inline else await anyio.to_thread.run_sync(steps.send, found)
            if step is FINISHED:
                break
            found = await self._take_step(step)
        await self._send()

    async def _take_step(self, step: nbdproto.serving.Step) -> int | None:
        """One step of inline_transmission: RECEIVE_READY (asked on our raw and TLS sockets only: writes stream
        in place there) receives what has arrived, into place, without waiting (its count; None when nothing had); every
        other step sends what is queued, then receives or waits for the budget as it says."""
        if step is RECEIVE_READY:
            stream, buffers = self.stream, self.logic.in_place_buffers()
            assert isinstance(stream, (RawSocketStream, TlsSocketStream)) and buffers is not None
            return await stream.receive_ready_into_buffers(buffers)
        await self._send()
        if step is RECEIVE:
            if not (self._lone_reads and self.logic.lone_reads_wanted and await self._answer_lone_reads()):
                await self._receive()
        elif type(step) is WaitForBudget:
            await self._share.take(step.amount)
        return None

    async def _concurrent_transmission(self) -> None:
        # Each request in a task of its own, its device calls in a worker thread; replies go out as they
        # complete. The budgets stop the reader while too much is in flight.
        logic, share, engine = self.logic, self._share, self.engine
        limits = logic.settings.limits
        budget = WaitingRequests(nbdproto.serving.RequestBudget(limits.max_requests, limits.memory_limit))
        self._shared_sending = True
        batch: list[nbdproto.serving.Work] = []
        async with anyio.create_task_group() as tasks:
            while True:
                end = logic.next_batch(batch)
                for request in batch:
                    if streamed_part(request):
                        # The parts of a streamed write are carried out in order, by the reader.
                        reply = await anyio.to_thread.run_sync(logic.carry_out_part, request)
                        if reply is not None:
                            engine.send(reply)
                        continue
                    cost = nbdproto.serving.request_cost(request)
                    await budget.wait_for_room()
                    await share.take(cost)
                    budget.add(cost)
                    tasks.start_soon(self._carry_out, request, cost, budget)
                batch.clear()
                if end is BatchEnd.NEED_DATA:
                    await self._send()
                    await budget.wait_for_room()
                    await self._receive()
                    continue
                # DISC with replies owed, or the end: let what is in flight finish.
                await budget.wait_idle()
                await self._send()
                if end is BatchEnd.CLOSED:
                    return

    async def _carry_out(self, request: Any, cost: int, budget: WaitingRequests) -> None:
        try:
            self.engine.send(await anyio.to_thread.run_sync(self.logic.carry_out_one, request, None))
            # A dead connection is the reading side's to notice: it ends the session.
            with contextlib.suppress(*_STREAM_GONE):
                await self._send()
        finally:
            budget.done(cost)
            self._share.give(cost)


def _holding(lock: threading.Lock, hand: Callable[[Any], None], value: Any) -> None:
    with lock:
        hand(value)


def _default_log() -> nbdproto.serving.ConnectionLog:
    return nbdproto.serving.ConnectionLog(log, time.monotonic, PEER_ERRORS)


def _client_of(stream: anyio.abc.ByteStream) -> nbdproto.ClientInfo:
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    return nbdproto.ClientInfo() if raw is None else client_info(raw)


Listening = SocketAcceptor | anyio.abc.Listener[Any]
"""What ``Server.serve`` accepts connections from."""


class Server(nbdproto.serving.ServerCore):
    """Serves exports to many clients at once, a task per connection, until ``shutdown()`` or cancellation.
    Arguments as nbdproto.serving.ServerCore says."""

    logger = log
    peer_errors = PEER_ERRORS
    clock = staticmethod(time.monotonic)
    _budget: SharedBudget | None = None  # made in serve(): an anyio.Event needs a running loop
    _stopped: anyio.Event | None = None
    _stop_asked = False

    async def serve(self, listener: Listening | Sequence[Listening]) -> None:
        """Serve every connection ``listener`` accepts (or each of several listeners: those socket activation
        passed, say) until ``shutdown()`` (or, for a oneshot policy, until its client is gone); ``listen()``
        makes the fast kind (a SocketAcceptor); any anyio Listener works too. Cancelling it ends every
        connection at once."""
        listeners = list(listener) if isinstance(listener, Sequence) else [listener]
        self._budget = SharedBudget(self.limits.memory_limit)
        stopped = self._stopped = anyio.Event()
        if self._stop_asked:  # shutdown() came first
            stopped.set()
        async with anyio.create_task_group() as connections:
            async with anyio.create_task_group() as accepting:
                for each in listeners:
                    accepting.start_soon(self._accept, each, connections)
                await stopped.wait()
                accepting.cancel_scope.cancel()
            for each in listeners:
                await each.aclose()
            self.stop_sessions()
            with anyio.move_on_after(self.limits.shutdown_grace):
                while self.sessions:
                    await anyio.sleep(0.01)
            connections.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish within the shutdown grace (answering new ones with
        ESHUTDOWN), then close every connection; ``serve()`` returns once that is done."""
        self.stop_accepting()
        await anyio.lowlevel.checkpoint()

    def stop_accepting(self) -> None:
        """Begin the shutdown (called in the event loop's thread): ``serve()`` stops accepting, lets the sessions
        finish, and returns (at once if it has not begun yet)."""
        self._stop_asked = True
        if self._stopped is not None:
            self._stopped.set()

    async def _accept(self, listener: Listening, tasks: anyio.abc.TaskGroup) -> None:
        if not isinstance(listener, SocketAcceptor):
            await listener.serve(self.handle, tasks)
            return
        backoff = AcceptBackoff(log)
        while True:
            try:
                stream = await listener.accept(self.accept_hold_back)
            except OSError as exc:
                await anyio.sleep(backoff.delay_after(exc))
                continue
            backoff.accepted()
            tasks.start_soon(self.handle, stream)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Serve one accepted connection to its end (a listener's handler), if the policy admits the client."""
        client = _client_of(stream)
        if not self.admit(client):
            await stream.aclose()
            return
        session = ServerSession(stream, self.settings, budget=self._budget, log=self.log, client=client)
        with self.serving(session, client):
            async with session:
                spec = self.spec_for(await session.negotiate(), client)
                if spec is not None:
                    await session.serve(spec)


async def listen(address: tuple[str, int] | str | socket.socket) -> SocketAcceptor:
    """Listen on (host, port), a unix socket path, or an already bound and listening socket; for
    ``Server.serve``."""
    sock = address if isinstance(address, socket.socket) else listen_socket(address)
    await anyio.lowlevel.checkpoint()
    return SocketAcceptor(sock)
