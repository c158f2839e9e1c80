"""The blocking NBD client: ``connect(uri)`` and a ``Client`` that many threads may use at once.

The handshake follows nbdproto.client.ClientNegotiation (TLS first when asked, extended headers or structured
replies, base:allocation, GO with block sizes, EXPORT_NAME for old servers), driven by the shared
nbdproto.client.ClientSessionLogic; the request methods are nbdproto.client.ClientRequests'. In transmission any
thread may call any method: requests from different threads are in flight together on the one connection, and a
reader thread hands each reply to the thread waiting for it; a request that is slow to go out never holds the reader
up (a server that sends its replies before it reads more would otherwise wait for us for ever). A server's error
reply raises ``nbdproto.NBDError`` (an OSError carrying the NBD errno); a protocol violation raises
RemoteProtocolError and closes the connection.
``timeout`` bounds every wait: the connect, the handshake, and each request (a request that times out raises
TimeoutError and closes the connection, whose state is then unknown).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import nbdproto
import nbdproto.client
from nbdproto.client import Blocking, ClientRequests, ClientSessionLogic
from nbdproto.sockets import Connection, SharedTls, connect_socket, negotiate_client, open_together
from nbdproto.tls import connection_context

if TYPE_CHECKING:
    pass

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

__all__ = [
    "Client",
    "Connection",
    "connect",
    "list_exports",
    "inquire",
    "export_info",
    "list_meta_contexts",
    "negotiate_client",
    "open_connection",
    "open_together",
    "connect_socket",
]

DEFAULT_TIMEOUT = 30.0

_READER_STOP = 10.0
"""Seconds ``close`` waits for the reader thread to stop once the socket's receiving side is shut."""

_TLS_DRAIN = 64
"""Receives the reader makes at most in one hold of the TLS lock, while bytes keep arriving without waiting: a
TLS record (16 KiB at most) a receive, so that a large read costs two timeout switches every 64 records, not
every record (bench/bench_tls_clients.py). Senders wait at most that long for the lock."""

_Opened = TypeVar("_Opened")


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None


class Client(ClientRequests[Blocking]):
    """A connected NBD client. Use ``connect()`` to make one; the request methods are ClientRequests'."""

    def __init__(self, connection: Connection) -> None:
        self.stream = connection.stream
        self.server = connection.server
        self.logic = connection.logic
        self.engine = connection.engine
        self._timeout = connection.stream.sock.gettimeout()
        # Locks, none held while waiting for another's holder to be let go by the server:
        self._lock = threading.Lock()  # the engine and the waiters
        self._send_lock = threading.Lock()  # each request's bytes leave whole, one request after another
        sock = connection.stream.sock
        # Over TLS, every call into OpenSSL under the shared connection's lock, without waiting.
        self._tls = SharedTls(sock) if isinstance(sock, ssl.SSLSocket) else None
        self._waiters: dict[int, _Waiter] = {}
        self._closed = False
        result = connection.result
        self.listing = result if isinstance(result, nbdproto.ExportList) else None
        self.handshake = result if isinstance(result, nbdproto.HandshakeComplete) else None
        if self.handshake is not None:
            self._reader = threading.Thread(target=self._read_replies, name="nbd-client-reader", daemon=True)
            self._reader.start()

    def _call(self, make: Callable[[int], nbdproto.Request], finish: Callable[[nbdproto.Event], Any]) -> Any:
        waiter = _Waiter()
        with self._lock:
            cookie = self.logic.submit(make)
            self._waiters[cookie] = waiter
            pieces = self.engine.data_to_send()
        # Sent outside the engine's lock: a send that waits (a large write to a server that stops reading until
        # its replies are read) must never keep the reader from taking replies in.
        self._send(pieces)
        if not waiter.done.wait(self._timeout):
            failure = TimeoutError(f"no reply within {self._timeout} s; the connection is closed")
            self.logic.fail(failure)
            self._shut()
            raise failure
        return finish(ClientSessionLogic.outcome(waiter.reply))

    # --- The reader -----------------------------------------------------------------------------------------

    def _read_replies(self) -> None:
        engine, stream, tls = self.engine, self.stream, self._tls
        try:
            while True:
                # The rest of a read's data is received straight into the caller's buffer, without the GIL
                # and without a copy; everything else comes in as big chunks for the engine to parse.
                if tls is not None:
                    self._read_tls(tls)
                    continue
                target = engine.read_buffer()
                try:
                    got: bytes | int = stream.recv() if target is None else stream.recv_into(target)
                except TimeoutError:
                    continue  # the socket's timeout bounds sends; a request's own wait bounds its reply
                with self._lock:
                    pending = self._take(got)
                if pending:
                    self._send(pending)
        except BaseException as exc:
            with self._lock:
                self.logic.fail(exc)
                waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter.reply = exc
                waiter.done.set()

    def _read_tls(self, tls: SharedTls) -> None:
        """Receives on a TLS connection (SharedTls): as many in one hold of its lock as find bytes waiting (up to
        _TLS_DRAIN); when the first finds none, the reader waits for more without the lock."""
        engine = self.engine
        received, pending = 0, []
        with tls.lock:
            for _ in range(_TLS_DRAIN):
                got = tls.receive_now(engine.read_buffer())
                if got is None:
                    break
                with self._lock:
                    pending += self._take(got)
                if not got:
                    break
                received += 1
        if pending:
            self._send(pending)
        elif not received:
            tls.wait_readable()

    def _take(self, got: bytes | int) -> list[nbdproto.Payload]:
        """Hand what was received to the engine and every complete reply to its waiter (under the lock); what
        the engine has to send then (NBD_CMD_DISC after ESHUTDOWN), for the caller to send without the lock."""
        engine = self.engine
        if type(got) is int:
            engine.received_into(got)
        else:
            engine.receive_data(got)  # type: ignore[arg-type]
        for event in self.logic.replies():
            waiter = self._waiters.pop(event.cookie)
            waiter.reply = event
            waiter.done.set()
        return engine.data_to_send()

    def _send(self, pieces: list[nbdproto.Payload]) -> None:
        """Write ``pieces`` whole (under the send lock); on TLS through SharedTls, whose waits for room (bounded
        by the connection's timeout) leave the reader free to take replies in."""
        if not pieces:
            return
        with self._send_lock:
            if self._tls is None:
                self.stream.send(pieces)
            else:
                self._tls.send(pieces, self._timeout)  # type: ignore[arg-type]

    # --- Closing --------------------------------------------------------------------------------------------

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection has ended (the server closed it, it broke, or ``close()``); whether it has,
        within ``timeout`` seconds. Requests made after it raise ConnectionError."""
        reader = getattr(self, "_reader", None)
        if reader is None:
            return True
        reader.join(timeout)
        return not reader.is_alive()

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC once replies are in) and close the socket; then stop the server
        started for this client, if one was."""
        if not self._closed:
            self._closed = True
            try:
                with self._lock:
                    farewell = self.engine.data_to_send() if self.logic.disconnect() else []
                self._send(farewell)
            except (OSError, nbdproto.ProtocolError):
                pass
            self._end()
        if self.server is not None:
            self.server.stop()

    def _shut(self) -> None:
        self._closed = True
        self._end()

    def _end(self) -> None:
        """Close the socket once the reader has stopped using it. A TLS socket must not be shut down (the TLS
        goodbye, SSL_shutdown) while another thread reads it (SSL_read): OpenSSL aborts the process. So the
        socket's receiving side is shut first, which ends the reader's wait, and the reader is waited for."""
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            with contextlib.suppress(OSError):
                self.stream.sock.shutdown(socket.SHUT_RD)
            reader.join(_READER_STOP)
        if self._tls is None:
            self.stream.close()
        else:
            self._tls.close()  # the goodbye under its lock: a send still trying does not meet it

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_connection(uri: str | None = None, **options: Unpack[nbdproto.ConnectOptions]) -> Connection:
    """Connect and negotiate as ``connect`` does, but hand back the negotiated Connection instead of a Client
    (with a ``command``, stop ``connection.server`` once done with it)."""
    return _negotiated(uri, options)


def _negotiated(uri: str | None, options: nbdproto.ConnectOptions, **asked: Any) -> Connection:
    target, plan = nbdproto.client.plan_connection(uri, options, **asked)
    given = connection_context(target, plan.tls, options.get("tls"), options.get("tls_psk"))
    if options.get("command") is None:
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        sock = connect_socket(target, timeout)
        try:
            connection = negotiate_client(sock, plan, tls=given, server_hostname=target.tls_hostname)
        except TimeoutError as exc:  # socket.timeout says only "timed out": say who and what
            where = target.socket if target.unix else f"{target.host}:{target.port}"
            limit = f" within {timeout:g} s" if timeout else ""
            raise TimeoutError(f"{where}: timed out: the server did not answer the handshake{limit}") from exc
    else:
        from nbdproto.sockets import ActivatedServer  # only here: the client commands start without it

        server = ActivatedServer(options["command"])
        try:
            sock = connect_socket(server.target(target), options.get("timeout", DEFAULT_TIMEOUT))
            connection = negotiate_client(sock, plan, tls=given, server_hostname=target.tls_hostname)
        except BaseException as exc:
            failure = server.failed(exc)
            if failure is exc:
                raise
            raise failure from exc
        connection = connection._replace(server=server)
    connection.engine.strict = options.get("strict", False)
    return connection


def connect(uri: str | None = None, **options: Unpack[nbdproto.ConnectOptions]) -> Client:
    """Connect to an NBD server by URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or by the ``host`` /
    ``port`` / ``socket_path`` / ``export_name`` options (nbdproto.ConnectOptions says what each does), or
    start a server: ``connect(command=["nbdkit", "memory", "1G"])`` runs it with socket activation and stops
    it when the client closes. ``tls`` is the client SSLContext (CA and client certificate); an nbds URI
    requires TLS. ``timeout`` (30 s by default) bounds every wait."""
    return Client(_negotiated(uri, options))


def _finish(connection: Connection) -> None:
    """Close a connection that ended in negotiation, and stop the server started for it, if one was."""
    connection.stream.close()
    if connection.server is not None:
        connection.server.stop()


def list_exports(uri: str | None = None, **options: Unpack[nbdproto.ConnectOptions]) -> list[nbdproto.ExportListing]:
    """The exports a server lists (NBD_OPT_LIST), with their descriptions."""
    connection = _negotiated(uri, options, list_exports=True)
    _finish(connection)
    listing = connection.result
    assert isinstance(listing, nbdproto.ExportList)
    return list(listing.exports)


def inquire(
    uri: str,
    *,
    list_exports: bool = False,
    info: bool = True,
    list_meta_contexts: Sequence[str] | None = (),
    **options: Unpack[nbdproto.ConnectOptions],
) -> nbdproto.Inquiry:
    """Ask a server about exports without selecting one (opt mode, nbdproto.client.ClientNegotiation): the URI's
    export, or every export it lists (``list_exports``); for each NBD_OPT_INFO (``info``) and the meta contexts
    ``list_meta_contexts`` asks for (its queries; empty for all; None for none)."""
    asked = {"list_exports": list_exports, "info": info, "list_meta_contexts": list_meta_contexts}
    connection = _negotiated(uri, options, go=False, **asked)
    _finish(connection)
    inquiry = connection.result
    assert isinstance(inquiry, nbdproto.Inquiry)
    return inquiry


def export_info(uri: str, **options: Unpack[nbdproto.ConnectOptions]) -> nbdproto.ExportDetails:
    """The URI's export as NBD_OPT_INFO and NBD_OPT_LIST_META_CONTEXT describe it, without selecting it;
    NegotiationError when the server refuses either."""
    return inquire(uri, **options).exports[0].checked()


def list_meta_contexts(uri: str, queries: Sequence[str] = (), **options: Unpack[nbdproto.ConnectOptions]) -> list[str]:
    """The meta contexts the server offers for the URI's export (NBD_OPT_LIST_META_CONTEXT; ``queries`` as
    the spec defines them, none for all), without selecting it."""
    details = inquire(uri, info=False, list_meta_contexts=queries, **options).exports[0].checked()
    return list(details.meta_contexts or ())
