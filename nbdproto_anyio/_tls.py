"""A server's TLS connection over one of our raw sockets, as an anyio ByteStream that calls OpenSSL directly.

anyio's TLSStream runs OpenSSL over memory BIOs: every record passes through a receive of bytes from the
transport stream, a copy into the BIO and a receive of at most a record's plaintext, as a new bytes object,
each a trip through the event loop; a reply is joined into one bytes object, encrypted into the BIO, read out
as another and sent. Here the TLS socket itself is non-blocking (nbdproto.sockets.TlsChannel: the same code the
threads server runs): a receive takes every record that has arrived straight into the payload's buffer and
the header after it, sends hand large payloads to OpenSSL as they are, and the stream awaits the socket
(anyio.wait_readable / wait_writable, on asyncio and trio alike) only when OpenSSL says it must.

The server wraps a RawSocketStream (``TlsSocketStream.wrap``) after NBD_OPT_STARTTLS; any other stream still
gets anyio's TLSStream. The extra attributes are those of TLSAttribute that the server and its log read
(the peer's certificate, the TLS object for ``nbdproto.tls.psk_identity``, the cipher and the version).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute

from nbdproto import Payload
from nbdproto.serving import RECV_SIZE
from nbdproto.sockets import TlsChannel

from ._readable import Readable
from ._socket import YIELD_EVERY, RawSocketStream

__all__ = ["TlsSocketStream"]


class TlsSocketStream(anyio.abc.ByteStream):
    """A server-side TLS connection on a non-blocking ``ssl.SSLSocket`` (see the module docstring)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self._readable = Readable(sock)
        self._channel = TlsChannel(sock)
        self._closed = False
        self._unyielded = 0

    @classmethod
    async def wrap(cls, raw: RawSocketStream, context: ssl.SSLContext) -> TlsSocketStream:
        """The server's side of the TLS handshake on ``raw`` (which must not be used afterwards), awaiting
        the socket as OpenSSL asks; the caller bounds how long it may take (a cancel scope)."""
        raw.readable.close()  # the socket is the TLS stream's from here on
        sock = context.wrap_socket(raw.sock, server_side=True, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await anyio.wait_readable(sock)
                except ssl.SSLWantWriteError:
                    await anyio.wait_writable(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def extra_attributes(self) -> Any:
        sock = self.sock
        return {
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: lambda: sock.getsockname(),
            SocketAttribute.remote_address: lambda: sock.getpeername(),
            TLSAttribute.peer_certificate: lambda: sock.getpeercert(False),
            TLSAttribute.peer_certificate_binary: lambda: sock.getpeercert(True),
            TLSAttribute.ssl_object: lambda: sock,
            TLSAttribute.cipher: sock.cipher,
            TLSAttribute.tls_version: sock.version,
            TLSAttribute.server_side: lambda: True,
            TLSAttribute.standard_compatible: lambda: False,
        }

    # --- Receiving ------------------------------------------------------------------------------------------

    async def receive(self, max_bytes: int = RECV_SIZE) -> bytes:
        channel = self._channel
        while (data := channel.receive(max_bytes)) is None:
            await self._wait_for(channel)
        await self._received()
        if not data:
            raise anyio.EndOfStream
        return data

    async def receive_ready(self, max_bytes: int = RECV_SIZE) -> bytes | None:
        """What has arrived already, without waiting: None when nothing has, ``b""`` once the peer closed."""
        data = self._channel.receive(max_bytes)
        if data is None:
            self._unyielded = 0
            return None
        await self._received()
        return data

    async def receive_into(self, buffer: memoryview) -> int:
        """Every record that has arrived, into ``buffer`` (waiting for the first); the count, 0 once the peer
        closed."""
        return await self.receive_into_buffers([buffer])

    async def receive_ready_into(self, buffer: memoryview) -> int | None:
        """``receive_into`` of bytes that have arrived already: None when none have."""
        return await self.receive_ready_into_buffers([buffer])

    async def receive_into_buffers(self, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` in order with what has arrived (TlsChannel.receive_into), waiting for the first
        bytes; the count, 0 once the peer closed."""
        got = await self.receive_ready_into_buffers(buffers, wait=True)
        assert got is not None
        return got

    async def receive_ready_into_buffers(self, buffers: list[memoryview], *, wait: bool = False) -> int | None:
        """``receive_into_buffers`` of bytes that have arrived already: None when none have."""
        channel = self._channel
        while (got := channel.receive_into(buffers)) is None:
            self._unyielded = 0
            if not wait:
                return None
            await self._wait_for(channel)
        await self._received()
        return got

    async def _received(self) -> None:
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()

    async def _wait_for(self, channel: TlsChannel) -> None:
        self._unyielded = 0
        try:
            if channel.wants_read:
                await self._readable.wait()
            else:
                await anyio.wait_writable(self.sock)
        except (ValueError, OSError) as exc:  # closed meanwhile
            raise anyio.ClosedResourceError from exc

    # --- Sending --------------------------------------------------------------------------------------------

    async def send(self, item: bytes) -> None:
        await self.send_pieces([item])

    async def send_pieces(self, pieces: Sequence[Payload]) -> None:
        """Write every piece in order (TlsChannel.queue: no joining of large payloads); FileRegions are not
        taken (a TLS connection's replies carry their data in buffers)."""
        channel = self._channel
        channel.queue(pieces)  # type: ignore[arg-type]
        try:
            while not channel.send_queued():
                await self._wait_for(channel)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        raise NotImplementedError("a TLS stream cannot send EOF and go on receiving")

    # --- Closing --------------------------------------------------------------------------------------------

    async def unwrap(self) -> None:
        """Say the TLS goodbye (close_notify) and wait for the peer's (the caller bounds how long)."""
        sock = self.sock
        while True:
            try:
                sock.unwrap()
                return
            except ssl.SSLWantReadError:
                await self._readable.wait()
            except ssl.SSLWantWriteError:
                await anyio.wait_writable(sock)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._readable.close()
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        await anyio.lowlevel.checkpoint()
