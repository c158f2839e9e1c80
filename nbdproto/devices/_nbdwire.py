"""One connection to a remote NBD server, driven straight through its engine for NbdDevice.

Why not the blocking client of a backend (``nbdproto_threads.Client``, which the devices must not import
anyway): a proxy pays the client's cost on every request, and that client hands each reply from its reader
thread to the thread waiting for it, one futex and one receive buffer per request. This wire takes requests
from any thread without waiting for their replies (``submit``: many in flight, one ``sendmsg`` for a whole
batch), and one reader thread of its own takes the replies in, matches each to its request by cookie and
hands it to the request's ``ReplySink``, every reply that one receive brought in one go, followed by one
``completed()`` per sink: a server that proxies gets each burst of replies at once and answers its client with
one send. ``run`` is the blocking form: submit, then wait.

The engine is only touched under ``_lock``. The socket is written under ``_send_lock`` alone, and read by the
reader thread outside both: a send that blocks never stops replies being read (a server that stops reading
requests until its replies are taken would otherwise wait for us forever).

Every wait has a limit when the wire has a ``timeout``: a request not answered by its deadline fails the whole
connection with ETIMEDOUT (NBD has no way to take one request back, so the connection is the thing to drop),
and so does a send that makes no progress for that long (a remote that stopped reading). The reader waits for
bytes a short tick at a time (SO_RCVTIMEO on a plain socket: no extra system call per receive) and looks at the
oldest request's deadline at each tick.

Over TLS one more rule holds: OpenSSL must never see the connection read in one thread while another writes it
or shuts it down (it corrupts memory). So a TLS connection is shared through ``nbdproto.sockets.SharedTls``:
every receive, send and the goodbye is made under its lock without waiting, and the waits for readability or
writability happen outside it, so a send that cannot go on still never stops replies being read.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import nbdproto.engine
import nbdproto.serving
import nbdproto.wire
from nbdproto.sockets import Connection, SharedTls, send_without_waiting

__all__ = ["Wire", "WireBroken", "WireTimedOut", "WireClosed", "ReplySink"]

_NEED_DATA, _PAUSED, _CLOSED = nbdproto.engine.NEED_DATA, nbdproto.engine.PAUSED, nbdproto.engine.ConnectionClosed
_GRACE = 1.0
"""Seconds past its deadline a caller of ``run`` waits for the reader to fail the connection, before it does."""

Make = Callable[[int], Any]
"""Builds a request event for a cookie."""


class WireBroken(ConnectionError):
    """The connection failed (the server went away or broke the protocol); the requests on it are lost."""


class WireTimedOut(WireBroken):
    """The server did not answer (or take a request) within the wire's timeout: the connection is given up."""


class WireClosed(WireBroken):
    """The connection had failed already: the requests were not sent (another connection may take them)."""


class ReplySink(Protocol):
    """Where a submitted request's outcome goes, from the wire's reader thread (or the submitting thread when
    the connection fails under it): ``complete(token, reply)`` with the reply event (ReadReply,
    BlockStatusReply, SuccessReply or ErrorReply) or the exception that failed the request; ``completed()``
    after each burst of them."""

    def complete(self, token: Any, reply: Any) -> None: ...

    def completed(self) -> None: ...


FailureHandler = Callable[["Wire", BaseException, bool], BaseException]
"""Told (wire, failure, whether requests were lost) once, when the connection fails; returns the exception the
requests in flight on it get."""


AFTER_PAYLOAD = 1024
"""The most the reader takes in right after the payload of a read bigger than a receive (RECV_SIZE), in the same
turn: the next reply's header and then some. More would bring the start of the next read's payload too, which
the engine then copies into its buffer (5% of a proxy's CPU for nbdcopy's 256 KiB reads when it took
RECV_SIZE), where the next turn receives it there straight from the socket. After a small read's payload (which
arrived in parts) nothing is taken so: a small receive there would leave the engine inside the next small reply,
and each reply would be a turn of its own, where a receive of RECV_SIZE takes dozens."""


def _tick(timeout: float) -> float:
    """How long the reader waits for bytes before it looks at the deadlines again."""
    return min(1.0, max(0.05, timeout / 10))


def _set_socket_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, int((seconds - whole) * 1e6)))


class _Waiter:
    """The sink of a blocking ``run``: the replies in order, and an event once all are in."""

    __slots__ = ("replies", "left", "done", "_lock")

    def __init__(self, count: int) -> None:
        self.replies: list[Any] = [None] * count
        self.left = count
        self.done = threading.Event()
        self._lock = threading.Lock()  # the reader and a thread failing the connection may both deliver

    def complete(self, token: int, reply: Any) -> None:
        self.replies[token] = reply
        with self._lock:
            self.left -= 1

    def completed(self) -> None:
        if self.left <= 0:
            self.done.set()


class Wire:
    """A negotiated connection (``nbdproto.sockets.Connection``, its socket blocking without a Python timeout)
    that carries requests. ``timeout``: the most a request may take, its send included (None: no limit).
    ``start`` begins reading replies; until then requests may be submitted but no reply is taken in."""

    def __init__(self, connection: Connection, timeout: float | None = None) -> None:
        self.stream = connection.stream
        self.engine = connection.engine
        self.sock: socket.socket = connection.stream.sock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # each batch's bytes leave whole, one batch after another
        self._cookies = itertools.count(1)
        self._waiting: dict[int, tuple[ReplySink, Any]] = {}
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, cookie), in the order sent
        self._failure: BaseException | None = None
        self._handled = False  # the failure was reported to the requests in flight
        self._on_failure: FailureHandler | None = None
        self._reader: threading.Thread | None = None
        self._tls = SharedTls(self.sock) if isinstance(self.sock, ssl.SSLSocket) else None
        self._tick: float | None = None
        if timeout is not None:
            self._tick = _tick(timeout)
            if self._tls is None:
                # A send that makes no progress, and a receive that gets nothing, for that long raise
                # BlockingIOError: bounded waits at no cost per call.
                _set_socket_timeout(self.sock, socket.SO_SNDTIMEO, timeout)
                _set_socket_timeout(self.sock, socket.SO_RCVTIMEO, self._tick)
        self.context_ids = {name: context_id for context_id, name in self.engine.meta_contexts.items()}
        """The ids this connection's server gave the meta contexts (each connection has its own)."""

    def start(self, on_failure: FailureHandler | None = None) -> None:
        """Start the reader thread. ``on_failure`` (see FailureHandler) turns the connection's failure into
        what the requests on it get (default: WireTimedOut or WireBroken)."""
        self._on_failure = on_failure
        self._reader = threading.Thread(target=self._read_replies, name="nbd-remote-reader", daemon=True)
        self._reader.start()

    def _failed(self) -> bool:
        """Whether the connection failed (a method, so that a check after the lock was let go is not narrowed
        away by the one before)."""
        return self._failure is not None

    @property
    def usable(self) -> bool:
        """False once the connection failed, the server closed it included (the reader sees that at once, so a
        server that went away between requests costs no request)."""
        return self._failure is None and self.engine.phase is nbdproto.engine.Phase.TRANSMISSION

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    # --- Requests -----------------------------------------------------------------------------------------

    def submit(self, makes: Sequence[Make], sink: ReplySink, tokens: Sequence[Any], deadline: float | None) -> None:
        """Send ``make(cookie)`` for each request together, without waiting for the replies: each reply (or the
        exception that failed its request) goes to ``sink.complete(token, ...)`` with the request's token.
        ``deadline``: the time.monotonic() by which every reply must be in (None: ``timeout`` from now). A
        request our own engine refuses gets OSError(EINVAL) at once. Raises WireClosed, having sent nothing,
        when the connection failed already; any later failure reaches the sink instead."""
        if deadline is None and self.timeout is not None:
            deadline = time.monotonic() + self.timeout
        pieces = self._register(makes, sink, tokens, deadline)
        if pieces:
            self._send_requests(pieces, deadline)

    def submit_nowait(
        self, makes: Sequence[Make], sink: ReplySink, tokens: Sequence[Any], deadline: float
    ) -> Callable[[], None] | None:
        """``submit`` for a thread that must not wait (an event loop): raises BlockingIOError, having sent
        nothing, where starting the requests could wait (another thread is sending on the connection, or it
        is TLS); WireClosed as ``submit``. Sends what the socket takes now and returns None, or, when it took
        less, a callable that sends the rest (it may wait: call it off the loop, soon; the connection sends
        nothing else until it has)."""
        if self._tls is not None or not self._send_lock.acquire(blocking=False):
            raise BlockingIOError(errno.EAGAIN, "the connection is busy sending")
        rest: list[Any] | None = None
        try:
            pieces = self._register(makes, sink, tokens, deadline)
            rest = send_without_waiting(self.sock, pieces) if pieces else None
        except WireClosed:
            raise
        except OSError as exc:  # the send failed: the requests on the connection get its failure
            self._fail(exc)
        finally:
            if rest is None:
                self._send_lock.release()
        return None if rest is None else functools.partial(self._send_rest, rest, deadline)

    def _register(
        self, makes: Sequence[Make], sink: ReplySink, tokens: Sequence[Any], deadline: float | None
    ) -> list[Any]:
        """Queue the requests in the engine, each waiting for its reply until ``deadline``; the bytes to send."""
        engine, waiting, deadlines = self.engine, self._waiting, self._deadlines
        refused: list[tuple[Any, BaseException]] = []
        when = float("inf") if deadline is None else deadline
        with self._lock:
            if self._failure is not None:
                raise WireClosed(f"the connection failed: {self._failure}")
            for make, token in zip(makes, tokens, strict=True):
                cookie = next(self._cookies)
                try:
                    engine.send(make(cookie))
                except nbdproto.wire.LocalProtocolError as exc:  # refused by our engine: nothing of it is queued
                    refused.append((token, OSError(errno.EINVAL, str(exc))))
                    continue
                waiting[cookie] = (sink, token)
                deadlines.append((when, cookie))
            pieces = engine.data_to_send()
        for token, failure in refused:
            sink.complete(token, failure)
        if refused:
            sink.completed()
        return pieces

    def run(self, makes: Sequence[Make], deadline: float | None = None) -> list[Any]:
        """``submit``, then wait for every reply: returns them in order (ReadReply, BlockStatusReply,
        SuccessReply or ErrorReply). Raises the exception that failed any of them (the ``on_failure`` handler's,
        or WireBroken / WireTimedOut; WireClosed when nothing was sent)."""
        if deadline is None and self.timeout is not None:
            deadline = time.monotonic() + self.timeout
        waiter = _Waiter(len(makes))
        self.submit(makes, waiter, range(len(makes)), deadline)
        if deadline is None:
            waiter.done.wait()
        elif not waiter.done.wait(max(0.0, deadline - time.monotonic()) + _GRACE + (self._tick or 0)):
            self._time_out("no reply")  # the reader could not (blocked inside a receive): fail it from here
            waiter.done.wait(_GRACE)
        for reply in waiter.replies:
            if isinstance(reply, BaseException):
                raise reply
        if waiter.left:
            raise self._failed_as()
        return waiter.replies

    def _send_requests(self, pieces: list[Any], deadline: float | None) -> None:
        # Sent outside the engine's lock: a send that blocks (large writes, a server that stopped reading until
        # its replies are read) must not keep the reader from taking those replies in.
        if not self._send_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            self._time_out("no room to send a request")
            return
        self._send_rest(pieces, deadline)

    def _send_rest(self, pieces: list[Any], deadline: float | None) -> None:
        """Send ``pieces`` with _send_lock held, and let it go."""
        try:
            self._send(pieces, deadline)
        except (BlockingIOError, TimeoutError):  # no room for the request: the server stopped reading
            self._time_out("the server stopped taking requests")
        except OSError as exc:
            self._fail(exc)
        finally:
            self._send_lock.release()

    def _send(self, pieces: list[Any], deadline: float | None = None) -> None:
        """Write ``pieces`` (with _send_lock held); over TLS through SharedTls. A plain socket's send raises
        BlockingIOError after ``timeout`` without progress (SO_SNDTIMEO), TLS's TimeoutError."""
        if self._tls is None:
            self.stream.send(pieces)
        else:
            self._tls.send(pieces, None if deadline is None else max(0.01, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, "the request took too long to send")

    # --- Replies ------------------------------------------------------------------------------------------

    def _read_replies(self) -> None:
        """The reader thread: receive, hand each burst of replies to their sinks, until the connection fails."""
        try:
            self._read_until_failed()
        finally:
            if self._tls is None:
                self.stream.close()

    def _read_until_failed(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                if self._failure is not None:
                    return
                target = engine.read_buffer()
                big = engine.arriving_read_size > nbdproto.serving.RECV_SIZE
            try:
                got = self._receive(target)
            except OSError as exc:
                self._fail(exc)
                return
            if got is None:  # a tick with nothing: is the oldest request late?
                if self._late():
                    self._time_out("no reply")
                continue
            # A big read's payload received whole: the start of the reply after it, as far as it is here, goes to
            # the engine in this turn too, not in a turn (locks, a pass of the engine, a hand-over) of its own.
            after = self._receive_ready() if big and target is not None and got == len(target) else None
            burst: list[tuple[ReplySink, Any, Any]] = []
            farewell: list[Any] | None = None
            with self._lock:
                if self._failed():  # (the lock was let go meanwhile: another thread may have failed it)
                    return
                try:
                    if target is None:
                        engine.receive_data(got)  # type: ignore[arg-type]
                    else:
                        engine.received_into(got)  # type: ignore[arg-type]
                        if after is not None:
                            engine.receive_data(after)
                    farewell = self._route_replies(burst)
                except (nbdproto.wire.ProtocolError, WireBroken) as exc:
                    failure: BaseException | None = exc
                else:
                    failure = None
            _deliver(burst)
            if farewell:
                self._say_goodbye(farewell)
                self._fail(WireBroken("the server is shutting down"))
                return
            if failure is not None:
                self._fail(failure)
                return

    def _receive(self, target: memoryview | None) -> bytes | int | None:
        """The next bytes (into ``target`` when given: a count), or None when a tick passed without any. The rest
        of a read's payload (``target``) is waited for whole (MSG_WAITALL; a tick still ends the wait, with what
        came): a 256 KiB reply came in as several receives, each a turn of this loop and a hand-over of the
        interpreter lock (bench/bench_proxy.sh, nbdcopy through the threads proxy: 0.77-0.79x nbdkit's nbd plugin,
        0.82-0.90x with it, in two runs)."""
        tls = self._tls
        try:
            if tls is not None:
                return tls.receive(target, nbdproto.serving.RECV_SIZE, self._tick)
            if target is None:
                return self.sock.recv(nbdproto.serving.RECV_SIZE)  # (why that many: its docstring)
            return self.sock.recv_into(target, 0, socket.MSG_WAITALL)
        except BlockingIOError:  # the receive timer's tick passed with nothing (plain sockets)
            return None

    def _receive_ready(self) -> bytes | None:
        """After a read's payload: the bytes already here, up to AFTER_PAYLOAD (b"": the server closed), without
        waiting; None when none are, or when the connection is TLS (whose receive takes every record that is
        here already)."""
        if self._tls is not None:
            return None
        try:
            return self.sock.recv(AFTER_PAYLOAD, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # the next receive meets it, and fails the connection there

    def _route_replies(self, burst: list[tuple[ReplySink, Any, Any]]) -> list[Any] | None:
        """Take every reply the engine has for the request it answers (with the lock held); the goodbye to send
        when the server said it is shutting down."""
        engine, waiting = self.engine, self._waiting
        while True:
            event = engine.next_event()
            if event is _NEED_DATA or event is _PAUSED:
                return None
            if type(event) is _CLOSED:
                raise WireBroken("the server closed the connection")
            sink, token = waiting.pop(event.cookie)  # type: ignore[union-attr]
            burst.append((sink, token, event))
            if engine.server_shutting_down and engine.must_disconnect:  # it said ESHUTDOWN: leave as the spec asks
                engine.send(nbdproto.engine.DisconnectRequest())
                self._failure = WireBroken("the server is shutting down")  # no request may follow
                return engine.data_to_send()

    def _late(self) -> bool:
        """Whether the oldest request still in flight is past its deadline."""
        with self._lock:
            deadlines, waiting = self._deadlines, self._waiting
            while deadlines and deadlines[0][1] not in waiting:
                deadlines.popleft()
            return bool(deadlines) and deadlines[0][0] <= time.monotonic()

    def _say_goodbye(self, pieces: list[Any]) -> None:
        # Lock order: _send_lock, then _lock, never the other way round.
        with self._send_lock, contextlib.suppress(OSError):
            self._send(pieces)

    # --- Failure ------------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, handle: bool = True) -> None:
        """The connection is lost: every request on it fails, once (with what ``on_failure`` makes of the first
        failure; without ``handle``, with ``exc`` itself), and the socket is shut down."""
        with self._lock:
            if self._failure is None:
                self._failure = exc
            if self._handled:
                return
            self._handled = True
            failure = self._failure
            lost = list(self._waiting.values())
            self._waiting.clear()
            self._deadlines.clear()
        error: BaseException = failure if handle else exc
        if handle:
            error = self._on_failure(self, failure, bool(lost)) if self._on_failure is not None else self._failed_as()
        _deliver([(sink, token, error) for sink, token in lost])
        self._shut()

    def _time_out(self, what: str) -> None:
        """A deadline passed: the connection fails for every request on it."""
        limit = f" within {self.timeout:g} s" if self.timeout is not None else " in time"
        self._fail(TimeoutError(errno.ETIMEDOUT, what + limit))

    def abandon(self, failure: BaseException) -> None:
        """Fail every request on the connection with ``failure`` (the device gave up on the server), then
        close it."""
        self._fail(failure, handle=False)

    def _failed_as(self) -> WireBroken:
        """What a request on the failed connection gets by default: WireTimedOut when it failed by a timeout."""
        failure = self._failure
        kind = WireTimedOut if isinstance(failure, TimeoutError) else WireBroken
        return kind(f"the connection failed: {failure}")

    def _shut(self) -> None:
        """End the socket's use: a reader waiting in a receive wakes up (and finds the failure). A plain socket
        is closed by its reader as it leaves (or by ``close``): closed under a receive, its descriptor could be
        another socket's by the time the receive is made."""
        if self._tls is None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        else:
            # The goodbye under the lock, without waiting; then the socket's shutdown ends a reader's wait, and
            # its next receive finds the socket closed.
            self._tls.close()

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) when the connection still works, and close the socket. A send
        blocked for 5 s (a server that stopped reading) is not waited for: closing the socket ends it; nor is
        one on a connection that failed already (nothing polite is sent there). Requests still in flight fail."""
        polite = self._failure is None and self._send_lock.acquire(timeout=min(5.0, self.timeout or 5.0))
        try:
            farewell: list[Any] = []
            with self._lock:
                if polite and self._failure is None and self.engine.phase is nbdproto.engine.Phase.TRANSMISSION:
                    with contextlib.suppress(nbdproto.wire.ProtocolError):
                        self.engine.send(nbdproto.engine.DisconnectRequest())
                        farewell = self.engine.data_to_send()
            if farewell:
                with contextlib.suppress(OSError):
                    self._send(farewell)
        finally:
            if polite:
                self._send_lock.release()
        self._fail(WireBroken("the connection was closed"), handle=False)
        self._shut()  # (again, for a connection that had failed: shutting down twice does nothing)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5.0)
        if self._tls is None and (reader is None or not reader.is_alive()):
            self.stream.close()


def _deliver(burst: Iterable[tuple[ReplySink, Any, Any]]) -> None:
    """Hand each outcome to its sink, then tell each sink once that the burst is over."""
    sinks: dict[int, ReplySink] = {}
    for sink, token, reply in burst:
        sink.complete(token, reply)
        sinks[id(sink)] = sink
    for sink in sinks.values():
        sink.completed()
