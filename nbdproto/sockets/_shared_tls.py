"""SharedTls: one TLS connection that several threads receive from and send on at once.

Two rules make that safe. OpenSSL must never be inside one connection in two threads at once: a read in one
thread while another writes or says goodbye corrupts memory (the threads client crashed so). And no thread may
wait inside OpenSSL while it holds the others out: a send blocked on a peer that stops reading until its own
replies are taken would keep the reader from taking them, for ever. So while a connection is shared its socket
never blocks: every call into OpenSSL is made under one lock and returns at once, and the waits, for bytes to
arrive or for room to send, happen outside the lock. They are poll() calls, not select (descriptors past 1024
too) nor epoll: a socket closed while another thread waits in epoll leaves it waiting for ever, where poll
finds the descriptor gone.

The threads server's connections whose replies a pool of threads sends, the threads client (a reader thread
and any number of callers) and NbdDevice's connections (callers taking turns to read) all share their TLS
connections through it.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence

from nbdproto.serving import RECV_SIZE

__all__ = ["SharedTls"]

_Piece = bytes | bytearray | memoryview


class SharedTls:
    """Shares the TLS socket ``sock`` between threads (see the module docstring) until ``release`` or ``close``.

    ``lock`` is held for every call into OpenSSL; a caller may hold it across several ``receive_now`` calls
    (to take every record already here in one go)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._timeout = sock.gettimeout()
        sock.settimeout(0)
        self._readable = selectors.PollSelector()
        self._readable.register(sock, selectors.EVENT_READ)
        self._writable = selectors.PollSelector()
        self._writable.register(sock, selectors.EVENT_WRITE)

    def receive_now(self, target: memoryview | None = None, size: int = RECV_SIZE) -> bytes | int | None:
        """With ``lock`` held: bytes that are here already (into ``target`` when given: a count), or None when
        none are (a record that carried nothing for us counts as none); ``b""`` (or 0) when the peer closed (a
        reset counts as closed)."""
        sock = self.sock
        try:
            return sock.recv(size) if target is None else sock.recv_into(target)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ConnectionResetError, ssl.SSLEOFError):
            return b"" if target is None else 0

    def receive(
        self, target: memoryview | None = None, size: int = RECV_SIZE, timeout: float | None = None
    ) -> bytes | int | None:
        """The next bytes (as ``receive_now``), waiting up to ``timeout`` seconds for them (None: as long as it
        takes) without the lock; None when the wait ran out. OSError (EBADF) once ``close`` ran."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                got = self.receive_now(target, size)
            if got is not None:
                return got
            if deadline is None:
                self.wait_readable()
            elif not self.wait_readable(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                return None

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Wait, without the lock, until bytes arrive on the socket; False when ``timeout`` ran out first. Only
        after ``receive_now`` found none: bytes OpenSSL already holds do not wake it."""
        return _wait(self._readable, timeout)

    def send(self, pieces: Sequence[_Piece], timeout: float | None = None) -> None:
        """Send every piece, in order: in steps that do not wait, each under the lock, waiting for room without
        it. TimeoutError when a wait for room exceeds ``timeout`` seconds (None: no limit)."""
        data = memoryview(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        sock = self.sock
        while data:
            with self.lock:
                try:
                    data = data[sock.send(data) :]
                    continue
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            started = time.monotonic()
            if not _wait(self._writable, timeout) and timeout is not None and time.monotonic() - started >= timeout:
                raise TimeoutError(f"a send made no progress within {timeout} s")

    def release(self) -> None:
        """Stop sharing: the socket blocks again, with the timeout it had, for one thread's use."""
        with self.lock:
            self.sock.settimeout(self._timeout)
        self._readable.close()
        self._writable.close()

    def close(self) -> None:
        """Say the TLS goodbye (under the lock, without waiting for the peer's), shut the socket down (which
        ends any wait for it) and close it."""
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.sock.unwrap()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.sock.close()
        self._readable.close()
        self._writable.close()


def _wait(selector: selectors.BaseSelector, timeout: float | None) -> bool:
    """Whether the socket became ready within ``timeout``; False also when it was closed meanwhile (the call
    into OpenSSL that follows then fails with EBADF)."""
    try:
        return bool(selector.select(timeout))
    except (ValueError, OSError, KeyError, AttributeError):  # the selector was closed too
        return False
