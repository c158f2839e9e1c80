"""Connecting and negotiating as a blocking client, below every backend: what the threads client, ``nbdproto
copy`` and the remote device (``nbdproto.devices.NbdDevice``) share.

``connect_socket`` connects where an NBD URI points, ``negotiate_client`` runs a handshake plan over the
socket (``nbdproto.client.ClientSessionLogic``, TLS included) and hands back a ``Connection``, and
``open_together`` opens several at once. ``nbdproto_threads`` re-exports them.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from nbdproto.client import ClientNegotiation, ClientSessionLogic, NbdUri, connect_error
from nbdproto.engine import ClientConnection, HandshakeStep
from nbdproto.wire import LocalProtocolError

from ._stream import SocketStream

if TYPE_CHECKING:
    from ._launch import ActivatedServer

__all__ = ["Connection", "negotiate_client", "connect_socket", "open_together"]

_Opened = TypeVar("_Opened")


class Connection(NamedTuple):
    """A negotiated connection, for callers that drive the engine themselves (``nbdproto_threads.copy`` and
    ``NbdDevice`` do; ``nbdproto_threads.Client`` is the usual way): the socket stream and the session logic, its
    engine in transmission (or done, after a listing)."""

    stream: SocketStream
    logic: ClientSessionLogic
    server: ActivatedServer | None = None
    """The server started for this connection (``connect(command=[...])``), to stop once it is closed."""

    @property
    def engine(self) -> ClientConnection:
        return self.logic.engine

    @property
    def result(self) -> Any:
        """The handshake's result: HandshakeComplete, or the ExportList of a listing."""
        return self.logic.result


def negotiate_client(
    sock: socket.socket,
    plan: ClientNegotiation,
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Connection:
    """Run the handshake ``plan`` on a connected blocking socket (closed if the handshake fails). The socket's
    timeout bounds each wait."""
    stream = SocketStream(sock)
    logic = ClientSessionLogic(ClientConnection(), plan)
    engine = logic.engine
    try:
        while (step := logic.handshake_step()) is not HandshakeStep.DONE:
            stream.send(engine.data_to_send())
            if step is HandshakeStep.EXCHANGE:
                engine.receive_data(stream.recv())
            elif tls is None:
                raise LocalProtocolError("STARTTLS accepted but no TLS context was given")
            else:
                stream.sock = tls.wrap_socket(stream.sock, server_hostname=server_hostname)
                logic.tls_established()
        stream.send(engine.data_to_send())
    except BaseException:
        stream.close()
        raise
    return Connection(stream, logic)


def connect_socket(uri: NbdUri, timeout: float | None) -> socket.socket:
    """A blocking socket connected to where ``uri`` points (a unix socket, or TCP with Nagle's algorithm off),
    with ``timeout`` on every call, the handshake's included: a server that accepts and says nothing cannot
    hang the caller."""
    try:
        if uri.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(uri.socket)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise connect_error(exc, uri) from None  # naming the address it could not reach
    return sock


def open_together(count: int, open_one: Callable[[], _Opened], close: Callable[[_Opened], None]) -> list[_Opened]:
    """``count`` connections made by ``open_one`` at once, each in a thread of its own (each handshake is a few
    round trips of waiting): all of them; or, when one fails, its exception, with those opened closed."""
    opened: list[_Opened] = []
    failures: list[BaseException] = []

    def open_in_thread() -> None:
        try:
            opened.append(open_one())
        except BaseException as exc:  # handed to the caller below
            failures.append(exc)

    threads = [threading.Thread(target=open_in_thread, name="nbd-connect") for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        for connection in opened:
            close(connection)
        raise failures[0]
    return opened
