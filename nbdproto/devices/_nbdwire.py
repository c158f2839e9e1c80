"""One connection to a remote NBD server, driven straight through its engine for NbdDevice.

Why not ``nbdproto_threads.Client``: a proxy pays the client's cost on every request, and that client hands
each reply from a reader thread to the waiting thread (measured here: about 6 futex calls and an
mmap/mremap/munmap of its 1 MiB receive buffer per request, 120-170 us of CPU per 4 KiB read). This wire has
no thread of its own. Callers send whole batches of requests at once (one ``sendmsg``), and whichever caller is
waiting reads the replies for everyone ("leader/follower"): a lone caller never hands anything to another
thread, and several callers share one connection with their requests in flight together.

The engine is only touched under ``_lock``. The socket is written under ``_send_lock`` alone, and read by the
one thread that holds the reader's role, outside both: a send that blocks never stops replies being read (a
server that stops reading requests until its replies are taken would otherwise wait for us forever).

Over TLS one more rule holds: OpenSSL must never see the connection read in one thread while another writes it
or shuts it down (it corrupts memory). So a TLS connection is shared through ``nbdproto.sockets.SharedTls``:
every receive, send and the goodbye is made under its lock without waiting, and the waits for readability or
writability happen outside it, so a send that cannot go on still never stops replies being read.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import nbdproto
import nbdproto.serving
from nbdproto.sockets import Connection, SharedTls

__all__ = ["Wire", "WireBroken"]

_NEED_DATA, _PAUSED, _CLOSED = nbdproto.NEED_DATA, nbdproto.PAUSED, nbdproto.ConnectionClosed


class WireBroken(ConnectionError):
    """The connection failed (the server went away or broke the protocol); the requests on it are lost."""


class _Batch:
    __slots__ = ("replies", "left")

    def __init__(self, count: int) -> None:
        self.replies: list[Any] = [None] * count
        self.left = count


class Wire:
    """A negotiated connection (``nbdproto.sockets.Connection``) that carries batches of requests."""

    def __init__(self, connection: Connection) -> None:
        self.stream = connection.stream
        self.engine = connection.engine
        self.sock: socket.socket = connection.stream.sock
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # each batch's bytes leave whole, one batch after another
        self._changed = threading.Condition(self._lock)
        self._cookies = itertools.count(1)
        self._waiting: dict[int, tuple[_Batch, int]] = {}
        self._reading = False
        self._failure: BaseException | None = None
        self._farewell: list[Any] | None = None
        self._tls = SharedTls(self.sock) if isinstance(self.sock, ssl.SSLSocket) else None
        self.context_ids = {name: context_id for context_id, name in self.engine.meta_contexts.items()}
        """The ids this connection's server gave the meta contexts (each connection has its own)."""

    @property
    def usable(self) -> bool:
        """False once the connection failed, or the server closed it while nothing was in flight (checked
        without blocking: a server that went away between requests costs no request)."""
        if self._failure is not None or self.engine.phase is not nbdproto.Phase.TRANSMISSION:
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

    def run(self, makes: Sequence[Callable[[int], Any]]) -> list[Any]:
        """Send ``make(cookie)`` for each request together, wait for every reply, and return them in order
        (ReadReply, BlockStatusReply, SuccessReply or ErrorReply). Raises WireBroken when the connection
        fails before every reply is in."""
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
        with self._send_lock:
            try:
                self._send(pieces)
            except OSError as exc:
                with self._lock:
                    self._fail(exc)
                raise WireBroken(f"the connection failed: {exc}") from exc
        self._wait(batch)
        return batch.replies

    def _wait(self, batch: _Batch) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while batch.left and self._reading and self._failure is None:
                    self._changed.wait()
                if not batch.left:
                    return
                self._raise_if_failed()
                self._reading = True
                target = engine.read_buffer()
            try:
                # The rest of a read's data straight into the caller's buffer; anything else as chunks.
                if self._tls is not None:
                    got = self._tls.receive(target)
                    assert got is not None  # (no timeout: it waits for bytes)
                    if isinstance(got, bytes):
                        data = got
                    else:
                        count = got
                elif target is None:
                    data = self.sock.recv(nbdproto.serving.RECV_SIZE)  # (why that many: its docstring)
                else:
                    count = self.sock.recv_into(target)
            except OSError as exc:
                with self._lock:
                    self._reading = False
                    self._fail(exc)
                raise WireBroken(f"the connection failed: {exc}") from exc
            with self._lock:
                self._reading = False
                try:
                    if target is None:
                        engine.receive_data(data)
                    else:
                        engine.received_into(count)
                    self._dispatch()
                except (nbdproto.ProtocolError, WireBroken) as exc:
                    self._fail(exc)
                self._changed.notify_all()  # replies for others, or the reader's role free to take
                farewell, self._farewell = self._farewell, None
            if farewell:
                self._say_goodbye(farewell)

    def _say_goodbye(self, pieces: list[Any]) -> None:
        # Lock order: _send_lock, then _lock, never the other way round.
        with self._send_lock, contextlib.suppress(OSError):
            self._send(pieces)

    def _send(self, pieces: list[Any]) -> None:
        """Write ``pieces`` (with _send_lock held); over TLS through SharedTls."""
        if self._tls is None:
            self.stream.send(pieces)
        else:
            self._tls.send(pieces)

    def _dispatch(self) -> None:
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
                engine.send(nbdproto.DisconnectRequest())
                self._farewell = engine.data_to_send()
                raise WireBroken("the server is shutting down")

    def _fail(self, exc: BaseException) -> None:
        """The connection is lost: every request on it fails (called with the lock held)."""
        if self._failure is None:
            self._failure = exc
        self._waiting.clear()
        self._changed.notify_all()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise WireBroken(f"the connection failed: {self._failure}") from self._failure

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC) when the connection still works, and close the socket. A send
        blocked for 5 s (a server that stopped reading) is not waited for: closing the socket ends it."""
        polite = self._send_lock.acquire(timeout=5)
        try:
            farewell: list[Any] = []
            with self._lock:
                if polite and self._failure is None and self.engine.phase is nbdproto.Phase.TRANSMISSION:
                    with contextlib.suppress(nbdproto.ProtocolError):
                        self.engine.send(nbdproto.DisconnectRequest())
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
