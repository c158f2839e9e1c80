"""One connection to a remote NBD server, driven straight through its engine for NbdDevice.

Why not the blocking client of a backend (``nbdproto_threads.Client``, which the devices must not import
anyway): a proxy pays the client's cost on every request, and that client hands each reply from a reader
thread to the waiting thread (futex calls, and a receive buffer per request). This wire has
no thread of its own. Callers send whole batches of requests at once (one ``sendmsg``), and whichever caller is
waiting reads the replies for everyone ("leader/follower"): a lone caller never hands anything to another
thread, and several callers share one connection with their requests in flight together.

The engine is only touched under ``_lock``. The socket is written under ``_send_lock`` alone, and read by the
one thread that holds the reader's role, outside both: a send that blocks never stops replies being read (a
server that stops reading requests until its replies are taken would otherwise wait for us forever).

Every wait has a limit when the wire has a ``timeout``: a batch whose replies are not all in by its deadline
fails the whole connection with ETIMEDOUT (NBD has no way to take one request back, so the connection is the
thing to drop), and so does a send that makes no progress for that long (a remote that stopped reading). The
reader waits for bytes a short tick at a time (SO_RCVTIMEO on a plain socket: no extra system call per
receive), so a reader whose own batch is late notices, and a follower whose batch is late (waiting on the
condition with its deadline) marks the connection failed and the reader notices at its next tick.

Over TLS one more rule holds: OpenSSL must never see the connection read in one thread while another writes it
or shuts it down (it corrupts memory). So a TLS connection is shared through ``nbdproto.sockets.SharedTls``:
every receive, send and the goodbye is made under its lock without waiting, and the waits for readability or
writability happen outside it, so a send that cannot go on still never stops replies being read.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import nbdproto.engine
import nbdproto.serving
import nbdproto.wire
from nbdproto.sockets import Connection, SharedTls

__all__ = ["Wire", "WireBroken", "WireTimedOut"]

_NEED_DATA, _PAUSED, _CLOSED = nbdproto.engine.NEED_DATA, nbdproto.engine.PAUSED, nbdproto.engine.ConnectionClosed


class WireBroken(ConnectionError):
    """The connection failed (the server went away or broke the protocol); the requests on it are lost."""


class WireTimedOut(WireBroken):
    """The server did not answer (or take a request) within the wire's timeout: the connection is given up."""


def _tick(timeout: float) -> float:
    """How long the reader waits for bytes before it looks at the deadlines again."""
    return min(1.0, max(0.05, timeout / 10))


def _set_socket_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, int((seconds - whole) * 1e6)))


class _Batch:
    __slots__ = ("replies", "left")

    def __init__(self, count: int) -> None:
        self.replies: list[Any] = [None] * count
        self.left = count


class Wire:
    """A negotiated connection (``nbdproto.sockets.Connection``, its socket blocking without a Python timeout)
    that carries batches of requests. ``timeout``: the most a batch may take, its send included (None: no
    limit)."""

    def __init__(self, connection: Connection, timeout: float | None = None) -> None:
        self.stream = connection.stream
        self.engine = connection.engine
        self.sock: socket.socket = connection.stream.sock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # each batch's bytes leave whole, one batch after another
        self._changed = threading.Condition(self._lock)
        self._cookies = itertools.count(1)
        self._waiting: dict[int, tuple[_Batch, int]] = {}
        self._reading = False
        self._failure: BaseException | None = None
        self._farewell: list[Any] | None = None
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

    @property
    def usable(self) -> bool:
        """False once the connection failed, or the server closed it while nothing was in flight (checked
        without blocking: a server that went away between requests costs no request)."""
        if self._failure is not None or self.engine.phase is not nbdproto.engine.Phase.TRANSMISSION:
            return False
        if self._waiting or self._tls is not None:  # (a TLS socket cannot be peeked at; its next request will tell)
            return True
        try:
            if not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                self._failure = WireBroken("the server closed the connection")
                return False
        except BlockingIOError:
            return True  # nothing to read: the connection is open
        except OSError as exc:
            self._failure = exc
            return False
        return True

    def run(self, makes: Sequence[Callable[[int], Any]], deadline: float | None = None) -> list[Any]:
        """Send ``make(cookie)`` for each request together, wait for every reply, and return them in order
        (ReadReply, BlockStatusReply, SuccessReply or ErrorReply). ``deadline``: the time.monotonic() by which
        every reply must be in (default: ``timeout`` from now). Raises WireBroken when the connection fails
        before every reply is in, WireTimedOut when the deadline passes first (the connection is then failed
        for every request on it)."""
        if deadline is None and self.timeout is not None:
            deadline = time.monotonic() + self.timeout
        batch = _Batch(len(makes))
        engine = self.engine
        with self._lock:
            self._raise_if_failed()
            for index, make in enumerate(makes):
                cookie = next(self._cookies)
                engine.send(make(cookie))  # a request our engine refuses raises here, before anything is sent
                self._waiting[cookie] = (batch, index)
            pieces = engine.data_to_send()
        # Sent outside the engine's lock: a send that blocks (large writes, a server that stopped reading until
        # its replies are read) must not keep the reader from taking those replies in.
        if not self._send_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            self._time_out("no room to send a request")
        try:
            self._send(pieces, deadline)
        except (BlockingIOError, TimeoutError):  # no room for the request: the server stopped reading
            self._time_out("the server stopped taking requests")
        except OSError as exc:
            with self._lock:
                self._fail(exc)
            raise self._failed_as() from exc  # the first failure: a timeout may have closed the socket under it
        finally:
            self._send_lock.release()
        self._wait(batch, deadline)
        return batch.replies

    def _wait(self, batch: _Batch, deadline: float | None) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while batch.left and self._reading and self._failure is None:
                    if deadline is None:
                        self._changed.wait()
                    elif not self._changed.wait(max(0.0, deadline - time.monotonic())) and batch.left:
                        self._time_out_locked()
                if not batch.left:
                    return
                self._raise_if_failed()
                if deadline is not None and time.monotonic() >= deadline:
                    self._time_out_locked()
                    self._raise_if_failed()
                self._reading = True
                target = engine.read_buffer()
            try:
                got = self._receive(target, deadline)
            except OSError as exc:
                with self._lock:
                    self._reading = False
                    self._fail(exc)
                    self._changed.notify_all()
                raise self._failed_as() from exc  # the first failure: a timeout may have closed the socket under it
            with self._lock:
                self._reading = False
                try:
                    if got is None:  # the deadline passed, or another waiter's did (the failure says which)
                        if self._failure is None:
                            self._time_out_locked()
                    else:
                        if target is None:
                            engine.receive_data(got)  # type: ignore[arg-type]
                        else:
                            engine.received_into(got)  # type: ignore[arg-type]
                        self._route_replies()
                except (nbdproto.wire.ProtocolError, WireBroken) as exc:
                    self._fail(exc)
                self._changed.notify_all()  # replies for others, or the reader's role free to take
                farewell, self._farewell = self._farewell, None
            if farewell:
                self._say_goodbye(farewell)

    def _receive(self, target: memoryview | None, deadline: float | None) -> bytes | int | None:
        """The next bytes (into ``target`` when given: a count), waiting a tick at a time until they come, the
        connection fails, or ``deadline`` passes (then None)."""
        tls, tick = self._tls, self._tick
        while True:
            try:
                if tls is not None:
                    got = tls.receive(target, nbdproto.serving.RECV_SIZE, tick)
                    if got is not None:
                        return got
                elif target is None:
                    return self.sock.recv(nbdproto.serving.RECV_SIZE)  # (why that many: its docstring)
                else:
                    return self.sock.recv_into(target)
            except BlockingIOError:  # the receive timer's tick passed with nothing (plain sockets)
                pass
            if self._failure is not None or (deadline is not None and time.monotonic() >= deadline):
                return None

    def _say_goodbye(self, pieces: list[Any]) -> None:
        # Lock order: _send_lock, then _lock, never the other way round.
        with self._send_lock, contextlib.suppress(OSError):
            self._send(pieces)

    def _send(self, pieces: list[Any], deadline: float | None = None) -> None:
        """Write ``pieces`` (with _send_lock held); over TLS through SharedTls. A plain socket's send raises
        BlockingIOError after ``timeout`` without progress (SO_SNDTIMEO), TLS's TimeoutError."""
        if self._tls is None:
            self.stream.send(pieces)
        else:
            self._tls.send(pieces, None if deadline is None else max(0.01, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, "the request took too long to send")

    def _route_replies(self) -> None:
        """Hand every reply the engine has to the batch waiting for it."""
        engine, waiting = self.engine, self._waiting
        while True:
            event = engine.next_event()
            if event is _NEED_DATA or event is _PAUSED:
                return
            if type(event) is _CLOSED:
                raise WireBroken("the server closed the connection")
            batch, index = waiting.pop(event.cookie)  # type: ignore[union-attr]
            batch.replies[index] = event
            batch.left -= 1
            if engine.must_disconnect:  # the server said ESHUTDOWN: leave as the spec asks (see _say_goodbye)
                engine.send(nbdproto.engine.DisconnectRequest())
                self._farewell = engine.data_to_send()
                raise WireBroken("the server is shutting down")

    def _fail(self, exc: BaseException) -> None:
        """The connection is lost: every request on it fails (called with the lock held)."""
        if self._failure is None:
            self._failure = exc
        self._waiting.clear()
        self._changed.notify_all()

    def _time_out_locked(self, what: str = "no reply") -> None:
        """A deadline passed: the connection fails for every request on it (called with the lock held)."""
        limit = f" within {self.timeout:g} s" if self.timeout is not None else " in time"
        self._fail(TimeoutError(errno.ETIMEDOUT, what + limit))

    def _time_out(self, what: str) -> None:
        with self._lock:
            self._time_out_locked(what)
        self._raise_if_failed()

    def abandon(self, failure: BaseException) -> None:
        """Fail every request on the connection with ``failure`` (the device gave up on the server), then
        close it."""
        with self._lock:
            self._fail(failure)
        self.close()

    def _failed_as(self) -> WireBroken:
        """What a request on the failed connection raises: WireTimedOut when it failed by a timeout."""
        failure = self._failure
        kind = WireTimedOut if isinstance(failure, TimeoutError) else WireBroken
        return kind(f"the connection failed: {failure}")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failed_as() from self._failure

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) when the connection still works, and close the socket. A send
        blocked for 5 s (a server that stopped reading) is not waited for: closing the socket ends it; nor is
        one on a connection that failed already (nothing polite is sent there)."""
        polite = self._failure is None and self._send_lock.acquire(timeout=min(5.0, self.timeout or 5.0))
        try:
            farewell: list[Any] = []
            with self._lock:
                if polite and self._failure is None and self.engine.phase is nbdproto.engine.Phase.TRANSMISSION:
                    with contextlib.suppress(nbdproto.wire.ProtocolError):
                        self.engine.send(nbdproto.engine.DisconnectRequest())
                        farewell = self.engine.data_to_send()
                if self._failure is None:
                    self._failure = WireBroken("the connection was closed")
                self._waiting.clear()
                self._changed.notify_all()
            if farewell:
                with contextlib.suppress(OSError):
                    self._send(farewell)
        finally:
            if polite:
                self._send_lock.release()
        if self._tls is None:
            self.stream.close()
        else:
            # The goodbye under the lock, without waiting; then the socket's shutdown ends a reader's wait, and
            # its next receive finds the socket closed.
            self._tls.close()
