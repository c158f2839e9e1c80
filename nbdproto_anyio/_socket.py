"""A connected socket as an anyio ByteStream that tries the system call first and waits only when it must.

anyio's own socket streams (on asyncio) read through a transport that owns the socket, so every receive and
send passes through callbacks, buffers and futures. NBD traffic is pipelined: when the server wants to read,
the next requests are usually already there, and a send usually fits in the socket buffer. So this stream
calls recv / sendmsg on the non-blocking socket directly and only awaits readiness (``_readable``, and
anyio.wait_writable) when the kernel says it would block. Measured with fio, 4 KiB
random reads at queue depth 16: see bench/ and the notes of the anyio issue.

It is a full anyio ByteStream, so TLS works as everywhere else: anyio's TLSStream wraps it after STARTTLS
(the server wraps it in its own TlsSocketStream instead, ``_tls``).
Listening: ``SocketAcceptor`` accepts on a non-blocking listening socket the same way; connecting:
``connect_socket``. ``receive_into`` lets a client receive read data straight into the caller's buffer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSStream

from nbdproto import FileRegion, Payload
from nbdproto.serving import RECV_SIZE
from nbdproto.sockets import IOV_MAX, step_past

from ._readable import Readable

__all__ = [
    "RawSocketStream",
    "SocketAcceptor",
    "YIELD_EVERY",
    "connect_socket",
    "receive",
    "send_pieces",
    "close_stream",
]

YIELD_EVERY = 8
"""Receives in a row that found data waiting, after which a stream lets the event loop run other tasks: one that
never waits would otherwise starve every other connection (48 clients streaming writes left a 49th with no reply
at all for seconds). Every 8th receive costs one trip through the loop."""


class RawSocketStream(anyio.abc.ByteStream):
    """A connected, non-blocking socket as an anyio ByteStream (see the module docstring)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.readable = Readable(sock)
        self._closed = False
        self._unyielded = 0  # receives in a row that did not have to wait

    @property
    def extra_attributes(self) -> Any:
        return {
            SocketAttribute.raw_socket: lambda: self.sock,
            SocketAttribute.family: lambda: self.sock.family,
            SocketAttribute.local_address: lambda: self.sock.getsockname(),
            SocketAttribute.remote_address: lambda: self.sock.getpeername(),
        }

    async def receive(self, max_bytes: int = RECV_SIZE) -> bytes:
        data = await self._recv(self.sock.recv, max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data  # type: ignore[no-any-return]

    async def receive_ready(self, max_bytes: int = RECV_SIZE) -> bytes | None:
        """Bytes that have arrived already, without waiting: None when none have, ``b""`` once the peer closed or
        broke the connection (a server arms its time limit only for a receive that has to wait)."""
        try:
            return await self._recv(self.sock.recv, max_bytes, False)  # type: ignore[no-any-return]
        except anyio.BrokenResourceError:
            return b""

    async def receive_into(self, buffer: memoryview) -> int:
        """Receive into ``buffer`` (no copy in Python); the count, 0 once the peer closed or broke the
        connection (what ``ClientConnection.received_into`` takes as the end of the stream)."""
        try:
            return await self._recv(self.sock.recv_into, buffer)  # type: ignore[no-any-return]
        except anyio.BrokenResourceError:
            return 0

    async def receive_ready_into(self, buffer: memoryview) -> int | None:
        """``receive_into`` of bytes that have arrived already: None when none have."""
        try:
            return await self._recv(self.sock.recv_into, buffer, False)  # type: ignore[no-any-return]
        except anyio.BrokenResourceError:
            return 0

    async def receive_into_buffers(self, buffers: list[memoryview]) -> int:
        """Receive into ``buffers`` in order, with one system call (recvmsg_into); the count, 0 once the peer
        closed or broke the connection."""
        got = await self.receive_ready_into_buffers(buffers, wait=True)
        assert got is not None
        return got

    async def receive_ready_into_buffers(self, buffers: list[memoryview], *, wait: bool = False) -> int | None:
        """``receive_into_buffers`` of bytes that have arrived already: None when none have."""
        try:
            got = await self._recv(self.sock.recvmsg_into, buffers, wait)  # (nbytes, ancdata, flags, address)
        except anyio.BrokenResourceError:
            return 0
        return None if got is None else got[0]

    async def _recv(self, call: Any, arg: Any, wait: bool = True) -> Any:
        while True:
            try:
                result = call(arg)
            except BlockingIOError:
                self._unyielded = 0
                if not wait:
                    return None
                await self.readable.wait()
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise anyio.BrokenResourceError from exc
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from exc
                raise anyio.BrokenResourceError from exc
            else:
                self._unyielded += 1
                if self._unyielded >= YIELD_EVERY:
                    # A peer that always has more to send never makes us wait: let the other tasks run.
                    self._unyielded = 0
                    await anyio.lowlevel.checkpoint()
                return result

    async def send(self, item: bytes) -> None:
        await self.send_pieces([item])

    def send_now(self, pieces: Sequence[Payload]) -> Sequence[Payload] | None:
        """Send what of ``pieces`` can go without waiting, with one sendmsg of the list as it is (a reply's
        header and data, the common case): None once all went, else what is left to ``send_pieces`` (all of
        it where the socket is full, or a FileRegion is among them: TypeError before anything is sent). A
        loop that answers one request at a time saves a coroutine a reply with it."""
        if not 1 < len(pieces) <= IOV_MAX:
            return pieces
        try:
            sent = self.sock.sendmsg(pieces)  # type: ignore[arg-type]
        except (TypeError, BlockingIOError):
            return pieces
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise anyio.BrokenResourceError from exc
        if sent == sum(map(len, pieces)):
            return None
        views: list[Any] = [p for p in pieces if len(p)]
        return views[step_past(views, 0, sent) :]

    async def send_pieces(self, pieces: Sequence[Payload]) -> None:
        """Write every piece in order: buffers with sendmsg (many per call), FileRegions with os.sendfile."""
        rest = self.send_now(pieces)
        if rest is None:
            return
        views: list[Any] = [p for p in rest if len(p)]
        start = 0
        try:
            while start < len(views):
                if type(views[start]) is FileRegion:
                    await self._sendfile(views[start])
                    start += 1
                    continue
                end = start
                while end < len(views) and end - start < IOV_MAX and type(views[end]) is not FileRegion:
                    end += 1
                try:
                    sent = self.sock.sendmsg(views[start:end])
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)
                    continue
                start = step_past(views, start, sent)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise anyio.BrokenResourceError from exc

    async def _sendfile(self, region: FileRegion) -> None:
        offset, left = region.offset, region.length
        while left:
            try:
                sent = os.sendfile(self.sock.fileno(), region.fd, offset, left)
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            if sent == 0:  # the file shrank: the client was promised the bytes, it gets zeroes
                await self.send_pieces([bytes(left)])
                return
            offset += sent
            left -= sent

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.readable.close()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        await anyio.lowlevel.checkpoint()


class SocketAcceptor:
    """Accepts connections on a bound, listening socket, waiting for readiness only when none is pending."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    async def accept(self, hold_back: Callable[[], float] | None = None) -> RawSocketStream:
        """The next connection. ``hold_back()``: seconds to let pass once one is pending before taking it (a
        socket shared with other processes, which may take it meanwhile: ServerCore.accept_hold_back)."""
        while True:
            delay = hold_back() if hold_back is not None else 0.0
            if delay:
                await anyio.wait_readable(self.sock)
                await anyio.sleep(delay)
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            if conn.family != socket.AF_UNIX:
                # Replies that complete one at a time (slow or remote devices) must not wait for the client's
                # delayed ACK of the previous one (Nagle): a proxy stalls without this (bench/bench_proxy.sh).
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return RawSocketStream(conn)

    async def aclose(self) -> None:
        self.sock.close()
        await anyio.lowlevel.checkpoint()


async def connect_socket(address: tuple[str, int] | str) -> RawSocketStream:
    """Connect to ``(host, port)`` or a unix socket path without blocking the event loop; like
    socket.create_connection, each address the host resolves to is tried in turn."""
    if isinstance(address, str):
        return RawSocketStream(await _connect(socket.AF_UNIX, 0, address))
    host, port = address
    failure: OSError | None = None
    for family, _, proto, _, sockaddr in await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        try:
            return RawSocketStream(await _connect(family, proto, sockaddr))
        except OSError as exc:
            failure = exc
    raise failure or OSError(f"{host!r} resolves to no address")


async def _connect(family: int, proto: int, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in (errno.EINPROGRESS, errno.EAGAIN):
            await anyio.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, f"cannot connect to {address}: {os.strerror(code)}")
    except BaseException:
        sock.close()
        raise
    return sock


async def close_stream(stream: anyio.abc.ByteStream, wait: float = 1.0) -> None:
    """Close ``stream``; a TLS stream first says so (close_notify, as the spec asks of both sides after DISC or
    ABORT), waiting at most ``wait`` seconds for the peer's own: a peer that never answers is not waited on."""
    if isinstance(stream, TLSStream) or hasattr(stream, "unwrap"):  # anyio's TLS, or the server's TlsSocketStream
        with anyio.move_on_after(wait), contextlib.suppress(Exception):
            await stream.unwrap()
    await stream.aclose()


async def receive(stream: anyio.abc.ByteStream, size: int = RECV_SIZE) -> bytes:
    """The next bytes from ``stream``, or ``b""`` once the peer closed or the connection broke (what the
    engines take as end of stream). Up to ``size`` bytes (nbdproto.serving.RECV_SIZE: why that many)."""
    try:
        return await stream.receive(size)
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
        return b""


class ReceivesReady(Protocol):
    """A stream of ours that can take what has arrived without waiting (RawSocketStream, TlsSocketStream)."""

    async def receive_ready(self, max_bytes: int = RECV_SIZE) -> bytes | None: ...


async def receive_ready(stream: ReceivesReady, size: int = RECV_SIZE) -> bytes | None:
    """``receive`` of what has arrived already, without waiting: None when nothing has."""
    try:
        return await stream.receive_ready(size)
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
        return b""


async def send_pieces(stream: anyio.abc.ByteStream, pieces: Sequence[Payload]) -> None:
    """Write the engine's pieces: as pieces on a stream that takes them (RawSocketStream: scatter-gather; the
    server's TlsSocketStream), joined once on any other stream."""
    send = getattr(stream, "send_pieces", None)
    if send is not None:
        await send(pieces)
    else:
        await stream.send(pieces[0] if len(pieces) == 1 else b"".join(pieces))  # type: ignore[arg-type]
