"""The blocking NBD client: ``connect(uri)`` and a ``Client`` that many threads may use at once.

The handshake follows nbdproto.ClientNegotiation (TLS first when asked, extended headers or structured
replies, base:allocation, GO with block sizes, EXPORT_NAME for old servers). In transmission any thread may
call any method: requests from different threads are in flight together on the one connection, and a reader
thread hands each reply to the thread waiting for it. A server's error reply raises ``NBDError`` (an OSError
carrying the NBD errno); a protocol violation raises RemoteProtocolError and closes the connection.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import nbdproto
from nbdproto import NBDError
from nbdproto._negotiation import ClientNegotiation, plan_connection
from nbdproto.tls import client_context

from ._stream import SocketStream

__all__ = ["Client", "Connection", "NBDError", "connect", "list_exports", "negotiate_client", "open_connection"]


class Connection(NamedTuple):
    """A negotiated connection, for callers that drive the engine themselves (``nbdproto copy`` does; ``Client``
    is the usual way): the socket stream, the engine in transmission (or done, after a listing), and the
    handshake's result (HandshakeComplete, or ExportList when the exports were listed)."""

    stream: SocketStream
    engine: nbdproto.ClientConnection
    result: Any


def negotiate_client(
    sock: socket.socket, plan: ClientNegotiation, *, tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:  # fmt: skip
    """Run the handshake ``plan`` on a connected blocking socket (closed if the handshake fails)."""
    stream = SocketStream(sock)
    engine = nbdproto.ClientConnection()
    try:
        while not plan.done:
            event = engine.next_event()
            if event is nbdproto.NEED_DATA:
                stream.send(engine.data_to_send())
                engine.receive_data(stream.recv())
                continue
            if event is nbdproto.PAUSED:
                raise nbdproto.LocalProtocolError("the handshake stalled with nothing to send")
            send = plan.step(event)  # type: ignore[arg-type]
            if isinstance(event, nbdproto.StartTLS):
                if tls is None:
                    raise nbdproto.LocalProtocolError("STARTTLS accepted but no TLS context was given")
                stream.send(engine.data_to_send())
                stream.sock = tls.wrap_socket(stream.sock, server_hostname=server_hostname)
                engine.tls_established()
                send = plan.tls_done()
            if isinstance(event, nbdproto.ConnectionClosed):
                raise ConnectionError("the server closed the connection during the handshake")
            if send is not None:
                engine.send(send)
        stream.send(engine.data_to_send())
    except BaseException:
        stream.close()
        raise
    return Connection(stream, engine, plan.result)


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None


class Client:
    """A connected NBD client. Use ``connect()`` to make one."""

    def __init__(self, connection: Connection) -> None:
        self.stream = connection.stream
        self.engine = connection.engine
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._cookies = itertools.count(1)
        self._failure: BaseException | None = None
        self._closed = False
        result = connection.result
        self.listing: nbdproto.ExportList | None = result if isinstance(result, nbdproto.ExportList) else None
        self.handshake = result if isinstance(result, nbdproto.HandshakeComplete) else None
        if self.handshake is not None:
            self._reader = threading.Thread(target=self._read_replies, name="nbd-client-reader", daemon=True)
            self._reader.start()

    # --- What the export is -------------------------------------------------------------------------------

    @property
    def export(self) -> nbdproto.Export:
        assert self.handshake is not None, "a listing connection has no export"
        return self.handshake.export

    @property
    def size(self) -> int:
        return self.export.size

    @property
    def flags(self) -> nbdproto.TransmissionFlags:
        return self.export.flags

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        return self.engine.meta_contexts

    def can(self, flag: nbdproto.TransmissionFlags) -> bool:
        """Whether the server advertised ``flag`` (e.g. ``TransmissionFlags.SEND_TRIM``)."""
        return bool(self.export.flags & flag)

    # --- Requests -------------------------------------------------------------------------------------------

    def _request(self, make: Any) -> Any:
        waiter = _Waiter()
        with self._lock:
            if self._failure is not None:
                raise ConnectionError(f"the connection failed: {self._failure}") from self._failure
            if self.engine.phase is not nbdproto.Phase.TRANSMISSION:
                raise ConnectionError(f"the connection is {self.engine.phase.value}")
            cookie = next(self._cookies)
            self.engine.send(make(cookie))
            self._waiters[cookie] = waiter
            self.stream.send(self.engine.data_to_send())
        waiter.done.wait()
        reply = waiter.reply
        if isinstance(reply, BaseException):
            raise ConnectionError(f"the connection failed: {reply}") from reply
        if isinstance(reply, nbdproto.ErrorReply):
            raise NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
        return reply

    def pread(self, length: int, offset: int, *, df: bool = False) -> bytes:
        return bytes(self.pread_into(bytearray(length), offset, df=df))

    def pread_into(self, buffer: bytearray | memoryview, offset: int, *, df: bool = False) -> memoryview:
        flags = nbdproto.CommandFlags.DF if df else nbdproto.NO_FLAGS
        reply = self._request(lambda c: nbdproto.ReadRequest(c, offset, len(buffer), flags, buffer))
        return reply.data  # type: ignore[no-any-return]

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False) -> None:
        flags = nbdproto.CommandFlags.FUA if fua else nbdproto.NO_FLAGS
        self._request(lambda c: nbdproto.WriteRequest(c, offset, data, flags))

    def flush(self) -> None:
        self._request(lambda c: nbdproto.FlushRequest(c))

    def trim(self, length: int, offset: int, *, fua: bool = False) -> None:
        flags = nbdproto.CommandFlags.FUA if fua else nbdproto.NO_FLAGS
        self._request(lambda c: nbdproto.TrimRequest(c, offset, length, flags))

    def zero(self, length: int, offset: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False) -> None:
        f = nbdproto.CommandFlags
        flags = (f(0) if may_trim else f.NO_HOLE) | (f.FAST_ZERO if fast else f(0)) | (f.FUA if fua else f(0))
        self._request(lambda c: nbdproto.WriteZeroesRequest(c, offset, length, flags))

    def cache(self, length: int, offset: int) -> None:
        self._request(lambda c: nbdproto.CacheRequest(c, offset, length))

    def block_status(
        self, length: int, offset: int, *, contexts: Sequence[str] | None = None, req_one: bool = False
    ) -> dict[str, tuple[nbdproto.Extent, ...]]:
        """Extents from ``offset``, by meta context name (all agreed contexts unless ``contexts`` says)."""
        names = dict(self.meta_contexts)
        ids = tuple(i for i, name in names.items() if contexts is None or name in contexts)
        flags = nbdproto.CommandFlags.REQ_ONE if req_one else nbdproto.NO_FLAGS
        wanted = () if contexts is None else ids
        reply = self._request(lambda c: nbdproto.BlockStatusRequest(c, offset, length, flags, wanted))
        return {names[i]: extents for i, extents in reply.extents.items()}

    # --- The reader -----------------------------------------------------------------------------------------

    def _read_replies(self) -> None:
        engine = self.engine
        try:
            while True:
                # The rest of a read's data is received straight into the caller's buffer, without the GIL
                # and without a copy; everything else comes in as big chunks for the engine to parse.
                target = engine.read_buffer()
                if target is None:
                    data = self.stream.recv()
                else:
                    count = self.stream.recv_into(target)
                with self._lock:
                    if target is None:
                        engine.receive_data(data)
                    else:
                        engine.received_into(count)
                    while True:
                        event = engine.next_event()
                        if event is nbdproto.NEED_DATA or event is nbdproto.PAUSED:
                            break
                        if isinstance(event, nbdproto.ConnectionClosed):
                            # Recorded before the lock is let go, so no caller sees a closed engine first.
                            self._failure = ConnectionError("the server closed the connection")
                            raise self._failure
                        waiter = self._waiters.pop(event.cookie)  # type: ignore[union-attr]
                        waiter.reply = event
                        waiter.done.set()
                    if engine.must_disconnect:  # the server said ESHUTDOWN: leave as the spec asks
                        engine.send(nbdproto.DisconnectRequest())
                        self.stream.send(engine.data_to_send())
        except BaseException as exc:
            with self._lock:
                self._failure = exc
                waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter.reply = exc
                waiter.done.set()

    # --- Closing --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Disconnect politely (NBD_CMD_DISC once replies are in) and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.handshake is not None and self._failure is None:
                with self._lock:
                    self.engine.send(nbdproto.DisconnectRequest())
                    self.stream.send(self.engine.data_to_send())
        except (OSError, nbdproto.ProtocolError):
            pass
        self.stream.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(uri: nbdproto.NbdUri, timeout: float | None) -> socket.socket:
    if uri.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(uri.socket)
    else:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def open_connection(
    uri: str | None = None,
    *,
    host: str = "localhost",
    port: int = nbdproto.DEFAULT_PORT,
    socket_path: str | None = None,
    export_name: str = "",
    tls: ssl.SSLContext | None = None,
    require_tls: bool | None = None,
    structured_replies: bool = True,
    extended_headers: bool = True,
    meta_contexts: Sequence[str] = (nbdproto.BASE_ALLOCATION,),
    timeout: float | None = 30.0,
) -> Connection:
    """Connect and negotiate as ``connect`` does, but hand back the negotiated Connection instead of a Client."""
    target, plan = plan_connection(
        uri, host=host, port=port, socket_path=socket_path, export_name=export_name, tls=tls is not None,
        require_tls=require_tls, structured_replies=structured_replies, extended_headers=extended_headers,
        meta_contexts=meta_contexts,
    )  # fmt: skip
    if plan.tls and tls is None:
        tls = client_context(target)  # the URI's TLS settings (nbdproto.tls)
    return negotiate_client(_open(target, timeout), plan, tls=tls, server_hostname=target.tls_hostname)


def connect(
    uri: str | None = None,
    *,
    host: str = "localhost",
    port: int = nbdproto.DEFAULT_PORT,
    socket_path: str | None = None,
    export_name: str = "",
    tls: ssl.SSLContext | None = None,
    require_tls: bool | None = None,
    structured_replies: bool = True,
    extended_headers: bool = True,
    meta_contexts: Sequence[str] = (nbdproto.BASE_ALLOCATION,),
    timeout: float | None = 30.0,
) -> Client:
    """Connect to an NBD server by URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or by host/port or
    socket_path. ``tls`` is the client SSLContext (CA and client certificate); an nbds URI requires TLS."""
    return Client(
        open_connection(
            uri, host=host, port=port, socket_path=socket_path, export_name=export_name, tls=tls,
            require_tls=require_tls, structured_replies=structured_replies, extended_headers=extended_headers,
            meta_contexts=meta_contexts, timeout=timeout,
        )
    )  # fmt: skip


def list_exports(uri: str, *, tls: ssl.SSLContext | None = None) -> list[nbdproto.ExportListing]:
    """The exports a server lists (NBD_OPT_LIST), with their descriptions."""
    target, plan = plan_connection(uri, tls=tls is not None, list_exports=True)
    if plan.tls and tls is None:
        tls = client_context(target)  # the URI's TLS settings (nbdproto.tls)
    client = Client(negotiate_client(_open(target, 30.0), plan, tls=tls, server_hostname=target.tls_hostname))
    client.close()
    assert client.listing is not None
    return list(client.listing.exports)
