"""A blocking socket as the engine's byte pipe: big reads, and writes of many pieces in few system calls.

The engine hands out what to send as a list of pieces (headers, and payloads as the caller's own buffers).
On a plain socket they go out with ``sendmsg`` (scatter-gather, no joining, up to IOV_MAX pieces a call), and
FileRegion pieces with ``os.sendfile``; an ``ssl.SSLSocket`` has neither, so there the pieces are joined once
and written with ``sendall`` (the server never makes FileRegions for TLS connections).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Sequence

from nbdproto.engine import FileRegion, Payload
from nbdproto.serving import RECV_SIZE

from ._sending import IOV_MAX, step_past

__all__ = ["SocketStream"]

_Piece = bytes | bytearray | memoryview


class SocketStream:
    """Reads and writes NBD traffic on one connected socket, plain or TLS."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, size: int = RECV_SIZE) -> bytes:
        """Up to ``size`` bytes (nbdproto.serving.RECV_SIZE: why that many); ``b""`` when the peer closed (a
        reset counts as closed)."""
        try:
            return self.sock.recv(size)
        except (ConnectionResetError, ssl.SSLEOFError):
            return b""

    def recv_ready(self, size: int) -> bytes | None:
        """Up to ``size`` bytes that have arrived already, without waiting (a blocking socket without a Python
        timeout only: the caller's to check); None when none have, ``b""`` when the peer closed."""
        try:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return b""

    def poll(self, seconds: float, buffer: memoryview | None = None, size: int = RECV_SIZE) -> bytes | int | None:
        """Spin for up to ``seconds`` on receives that do not wait (MSG_DONTWAIT), for the first bytes to come
        in: what ``recv`` (or, with ``buffer``, ``recv_into``) returns, or None when nothing came. A blocking,
        plaintext socket only (the caller's to check): a request that arrives while we spin costs no sleep and
        no wake-up, which is most of what one request at a time costs (bench/bench_qd1.sh)."""
        sock, flags = self.sock, socket.MSG_DONTWAIT
        deadline = time.perf_counter() + seconds
        try:
            while True:
                try:
                    return sock.recv(size, flags) if buffer is None else sock.recv_into(buffer, 0, flags)
                except BlockingIOError:
                    if time.perf_counter() > deadline:
                        return None
        except ConnectionResetError:
            return b"" if buffer is None else 0

    def arm_receive_timer(self, seconds: float) -> bool:
        """Make every blocking receive on this plaintext socket give up after ``seconds`` (SO_RCVTIMEO:
        ``recv``/``recv_into`` raise BlockingIOError). Unlike a Python timeout it costs nothing per receive
        (no poll before each one, no switching the socket between blocking and not). False where it cannot be
        set: a TLS socket (its reads must not fail half-way), or a platform without it."""
        sock = self.sock
        if type(sock) is not socket.socket or sock.gettimeout() is not None:
            return False
        whole = int(seconds)
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", whole, int((seconds - whole) * 1e6))
            )
        except (OSError, struct.error):
            return False
        return True

    def recv_into_buffers(self, buffers: list[memoryview], *, wait: bool = True) -> int | None:
        """Receive into ``buffers`` in order, with one system call (a plaintext socket only: recvmsg_into); 0
        when the peer closed (a reset counts as closed). With ``wait=False``, None when nothing has arrived."""
        try:
            return self.sock.recvmsg_into(buffers, 0, 0 if wait else socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            if wait:
                raise  # the armed receive timer ran out (arm_receive_timer)
            return None
        except ConnectionResetError:
            return 0

    def recv_into(self, buffer: memoryview) -> int:
        """Receive into ``buffer``; 0 when the peer closed (a reset counts as closed)."""
        try:
            return self.sock.recv_into(buffer)
        except (ConnectionResetError, ssl.SSLEOFError):
            return 0

    def send(self, pieces: Sequence[Payload]) -> None:
        """Write every piece, in order, blocking until all are sent. FileRegion pieces go out with
        os.sendfile, straight from the page cache (plain sockets only)."""
        sock = self.sock
        if type(sock) is socket.socket and 1 < len(pieces) <= IOV_MAX:
            # The common case in one call (a reply's header and data): buffers alone, which sendmsg takes as
            # they are (a FileRegion is not one: TypeError before anything is sent, and the loop below).
            try:
                sent = sock.sendmsg(pieces)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                if sent < sum(map(len, pieces)):
                    rest = list(pieces)
                    self._send_buffers(rest[step_past(rest, 0, sent) :])  # type: ignore[arg-type]
                return
        batch: list[_Piece] = []
        for piece in pieces:
            if type(piece) is FileRegion:
                self._send_buffers(batch, more=True)
                batch = []
                self._sendfile(piece)
            else:
                batch.append(piece)  # type: ignore[arg-type]
        self._send_buffers(batch)

    def _send_buffers(self, pieces: list[_Piece], more: bool = False) -> None:
        if not pieces:
            return
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) or len(pieces) == 1:
            sock.sendall(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return
        # MSG_MORE when a sendfile follows: the header and the file's bytes leave in the same packets.
        flags = socket.MSG_MORE if more else 0
        start = 0
        while start < len(pieces):
            start = step_past(pieces, start, sock.sendmsg(pieces[start : start + IOV_MAX], [], flags))
            while start < len(pieces) and not len(pieces[start]):
                start += 1

    def _sendfile(self, region: FileRegion) -> None:
        out = self.sock.fileno()
        offset, left = region.offset, region.length
        while left:
            sent = os.sendfile(out, region.fd, offset, left)
            if sent == 0:
                # The file shrank under us: the client was promised `length` bytes, and gets zeroes for the rest.
                self.sock.sendall(bytes(left))
                return
            offset += sent
            left -= sent

    def close(self) -> None:
        """Shut down and close the socket, ignoring a peer that is already gone."""
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.unwrap()
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
