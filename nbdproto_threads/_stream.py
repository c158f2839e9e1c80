"""A blocking socket as the engine's byte pipe: big reads, and writes of many pieces in few system calls.

The engine hands out what to send as a list of pieces (headers, and payloads as the caller's own buffers).
On a plain socket they go out with ``sendmsg`` (scatter-gather, no joining, up to IOV_MAX pieces a call);
an ``ssl.SSLSocket`` has no sendmsg, so there the pieces are joined once and written with ``sendall``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Sequence

__all__ = ["SocketStream", "RECV_SIZE"]

RECV_SIZE = 256 * 1024
"""Bytes asked of each recv: large, so one system call brings in many pipelined requests."""

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_Piece = bytes | bytearray | memoryview


class SocketStream:
    """Reads and writes NBD traffic on one connected socket, plain or TLS."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        """Up to RECV_SIZE bytes; ``b""`` when the peer closed (a reset counts as closed)."""
        try:
            return self.sock.recv(RECV_SIZE)
        except (ConnectionResetError, ssl.SSLEOFError):
            return b""

    def send(self, pieces: Sequence[_Piece]) -> None:
        """Write every piece, in order, blocking until all are sent."""
        if not pieces:
            return
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) or len(pieces) == 1:
            sock.sendall(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return
        views: list[_Piece] = list(pieces)
        start = 0
        while start < len(views):
            sent = sock.sendmsg(views[start : start + _IOV_MAX])
            # Step past what went out; a partial send leaves the tail of one piece at the front.
            while sent:
                first = len(views[start])
                if sent >= first:
                    sent -= first
                    start += 1
                else:
                    views[start] = memoryview(views[start])[sent:]
                    sent = 0
            while start < len(views) and not len(views[start]):
                start += 1

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
