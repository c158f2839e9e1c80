"""TlsChannel: one TLS connection driven without blocking, for a server that alone uses it.

Python's ``ssl.SSLSocket`` hands out at most one TLS record (16 KiB of plaintext) per call, and a socket with
a Python timeout polls before each call that finds nothing. A 256 KiB write's payload was thus 16 turns of the
server's loop, each with the engine's bookkeeping, and switching the socket between timeouts cost system calls
of its own. Here the socket never blocks and never has a timeout: ``receive_into`` takes every record that has
arrived straight into the buffers it is given (a write's payload, then the request header after it, in exactly
those sizes: OpenSSL keeps the rest of a decrypted record for the next call), in one call from the driver; a
wait happens only when nothing has arrived, and is the driver's (``wait_readable`` here, or an event loop's).

``queue`` and ``send_queued`` send the engine's pieces without joining them: small pieces (headers, small
replies) are copied together into chunks of a record's size, so that each record is full and each is a system
call; a large payload goes to OpenSSL as the buffer it is (it reads it straight into its records), its first
bytes joined with the header before it and its last bytes with what follows.

Records arrive with one system call for as many as OpenSSL's buffer holds, not two each (``read_ahead``, where
this Python allows it): every receive here goes on until OpenSSL wants more bytes, and only then waits.

Only one thread may use a TlsChannel (no lock): a connection whose replies pool threads send uses SharedTls.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from nbdproto.serving import RECV_SIZE

from ._read_ahead import read_ahead

__all__ = ["TlsChannel", "TLS_RECORD_SIZE"]

TLS_RECORD_SIZE = 16384
"""The most plaintext one TLS record carries (RFC 8446 section 5.1; RFC 5246 section 6.2.1 for TLS 1.2)."""

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_CLOSED = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError, ValueError)
"""How a receive finds the connection over: the peer closed or reset it, or this side shut it down (a shutdown
leaves ``ssl.SSLSocket`` without its TLS object: ValueError)."""


def _tls_object(sock: ssl.SSLSocket) -> Any:
    """What reads and writes ``sock``'s records: CPython's TLS object (``_ssl._SSLSocket``), whose ``read`` and
    ``write`` the SSLSocket's own call after two Python-level steps a record (a ``_checkClosed`` that does nothing,
    and a look that it still has the object); a record a request (libnbd sends each request in one) made them a
    fifth of the Python calls of a 4 KiB read at QD16 over TLS. ``sock`` itself where there is no such object (a
    socket shut down: its read and write then raise ValueError, which the callers take as the end; another
    Python). The object's ragged EOF raises SSLEOFError where the SSLSocket's read returns nothing: the callers
    take both as the end."""
    return getattr(sock, "_sslobj", None) or sock


class TlsChannel:
    """Drives the TLS socket ``sock`` without blocking (it is made non-blocking here, for good); see the
    module docstring. ``release(timeout)`` gives it back as a blocking socket with a timeout."""

    __slots__ = ("sock", "_units", "_poll", "_wants_read")

    def __init__(self, sock: ssl.SSLSocket) -> None:
        sock.settimeout(0.0)
        read_ahead(sock)
        self.sock = sock
        self._units: deque[Any] = deque()  # what send_queued writes, in order, each with one call into OpenSSL
        self._poll: Any = None  # made on the first wait (an event loop's driver never needs it)
        self._wants_read = False  # the last call into OpenSSL waits for bytes to arrive, not for room

    # --- Receiving ------------------------------------------------------------------------------------------

    def receive_into(self, buffers: Sequence[memoryview]) -> int | None:
        """Fill ``buffers``, in order and each to its end before the next, with bytes that have arrived: the
        count; None when none had (wait, then call again); 0 when the peer closed (a reset counts as closed).
        Stops early, with what it has, at the first record that has not arrived."""
        read = _tls_object(self.sock).read
        total = 0
        for buffer in buffers:
            size, filled = len(buffer), 0
            while filled < size:
                try:
                    got: int = read(size - filled, buffer[filled:] if filled else buffer)
                except _WANT as exc:
                    self._wants_read = isinstance(exc, ssl.SSLWantReadError)
                    return (total + filled) or None
                except _CLOSED:
                    return total + filled
                if not got:
                    return total + filled
                filled += got
            total += size
        return total

    def receive(self, size: int = RECV_SIZE) -> bytes | None:
        """Up to ``size`` bytes that have arrived, from as many records as have; None when none had, ``b""``
        when the peer closed (a reset counts as closed). A client that sends every request in a record of its
        own (libnbd does) has its pipelined requests taken in one call, as one receive takes them from a
        plaintext socket, so the server carries them out together and answers them with one send."""
        read = _tls_object(self.sock).read
        try:
            first: bytes = read(size)
        except _WANT as exc:
            self._wants_read = isinstance(exc, ssl.SSLWantReadError)
            return None
        except _CLOSED:
            return b""
        have = len(first)
        if not have or have >= size:
            return first
        more = [first]
        while have < size:
            try:
                piece: bytes = read(size - have)
            except _WANT as exc:
                self._wants_read = isinstance(exc, ssl.SSLWantReadError)
                break
            except _CLOSED:
                break  # the end shows at the next receive
            if not piece:
                break
            more.append(piece)
            have += len(piece)
        return first if len(more) == 1 else b"".join(more)

    def receive_within(
        self, timeout: float | None, buffers: Sequence[memoryview] | None = None, size: int = RECV_SIZE
    ) -> bytes | int | None:
        """``receive_into(buffers)`` (or ``receive(size)`` without buffers), waiting up to ``timeout`` seconds
        for the first bytes (None: as long as it takes); None when the wait ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self.receive(size) if buffers is None else self.receive_into(buffers)
            if got is not None:
                return got
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self.wait_readable(left)

    # --- Sending --------------------------------------------------------------------------------------------

    def queue(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Queue the engine's ``pieces`` for ``send_queued``, cut into the units OpenSSL is called with (module
        docstring): nothing is copied but the small pieces and the ends of large ones. A batch of small pieces
        only (the replies of 4 KiB reads) is joined at once and cut into records, a few calls instead of a turn
        of the loop below for every piece."""
        units, record = self._units, TLS_RECORD_SIZE
        if len(pieces) > 2 and max(map(len, pieces)) < record:
            # Small pieces only (replies of small reads, a batch of write replies): joined once, cut into records.
            joined = memoryview(b"".join(pieces))
            for start in range(0, len(joined), record):
                units.append(joined[start : start + record])
            return
        small: list[Any] = []
        held = 0  # bytes in small
        for piece in pieces:
            size = len(piece)
            if held + size < record:
                if size:
                    small.append(piece)
                    held += size
                continue
            view = memoryview(piece).cast("B") if type(piece) is not memoryview or piece.format != "B" else piece
            if held:  # fill the record begun with the start of this piece
                room = record - held
                small.append(view[:room])
                units.append(b"".join(small))
                view, small, held = view[room:], [], 0
            whole = len(view) - len(view) % record
            if whole:
                units.append(view[:whole])
            if whole < len(view):
                small.append(view[whole:])
                held = len(view) - whole
        if small:
            units.append(small[0] if len(small) == 1 else b"".join(small))

    def send_queued(self) -> bool:
        """Send what ``queue`` queued, as far as the socket takes it without waiting: True once all of it is
        sent; False when it must wait (``wait_writable``, or an event loop's wait for the socket, then call
        again). BrokenPipeError or ConnectionResetError when the peer is gone, ConnectionAbortedError when this
        side shut the connection down."""
        units, write = self._units, _tls_object(self.sock).write
        while units:
            try:
                write(units[0])  # a unit OpenSSL could not finish is called again with the same buffer
            except _WANT as exc:
                self._wants_read = isinstance(exc, ssl.SSLWantReadError)
                return False
            except ValueError as exc:  # shut down here (ssl.SSLSocket.shutdown drops its TLS object)
                raise ConnectionAbortedError("the connection was shut down") from exc
            units.popleft()
        return True

    def send(self, pieces: Sequence[bytes | bytearray | memoryview], timeout: float | None = None) -> None:
        """Queue ``pieces`` and send everything queued, waiting for room as long as it takes (``timeout``:
        TimeoutError when a wait for room lasts longer)."""
        self.queue(pieces)
        while not self.send_queued():
            if not self.wait_writable(timeout):
                raise TimeoutError(f"a send made no progress within {timeout} s")

    @property
    def queued(self) -> bool:
        """True while some of what was queued is not sent yet."""
        return bool(self._units)

    # --- Waiting, for a blocking driver ------------------------------------------------------------------------

    @property
    def wants_read(self) -> bool:
        """Whether the call that could not go on waits for bytes to arrive (else for room to send): a TLS 1.2
        renegotiation or a TLS 1.3 key update can make a send wait for bytes, and a receive wait for room."""
        return self._wants_read

    def wait_readable(self, timeout: float | None = None) -> bool:
        """After ``receive_into`` or ``receive`` found nothing: wait until the socket is ready for the call to
        go on (readable, or writable if OpenSSL asked for that); False when ``timeout`` ran out first."""
        return self._wait(timeout)

    def wait_writable(self, timeout: float | None = None) -> bool:
        """After ``send_queued`` returned False: as ``wait_readable``."""
        return self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        poll = self._poll
        try:
            if poll is None:
                poll = self._poll = select.poll()
                poll.register(self.sock, select.POLLIN)
            poll.modify(self.sock, select.POLLIN if self._wants_read else select.POLLOUT)
        except (OSError, ValueError):  # closed meanwhile: the call that follows finds the end
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # A socket shut down meanwhile reports POLLHUP: the call that follows finds the end.
                return bool(poll.poll(None if left is None else int(left * 1000) + 1))
            except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
                continue

    # --- Handing back ---------------------------------------------------------------------------------------

    def release(self, timeout: float | None) -> None:
        """Make the socket blocking again, with ``timeout`` (for the goodbye: a close that waits a moment for
        the peer's close_notify)."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(timeout)

    def shutdown(self) -> None:
        """Shut the socket down both ways: a wait for it in another thread ends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
