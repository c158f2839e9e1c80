"""The one receive buffer both connection roles parse from.

Bytes arrive as the driver's ``bytes`` objects; the buffer keeps them as they are (a list of chunks, never one
growing bytearray) so that taking a payload that lies inside one chunk is a zero-copy ``memoryview`` slice, and
a payload spread over many chunks costs exactly one join. Parsing many small messages out of one big chunk
is the hot path: ``header()`` unpacks straight from the current chunk without slicing.
"""

from __future__ import annotations

from collections import deque

from .headers import HeaderCodec

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Chunks of received bytes with a read position; ``len()`` is the number of unread bytes, and so is
    ``size`` (an attribute: the engine's hot paths read it without a call)."""

    __slots__ = ("_head", "_pos", "_rest", "size")

    def __init__(self) -> None:
        self._head: bytes = b""
        self._pos = 0
        self._rest: deque[bytes] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes. ``bytes`` are kept as they are; other buffers are copied once (the caller may reuse them)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        if self._pos == len(self._head) and not self._rest:
            self._head, self._pos = data, 0
        else:
            self._rest.append(data)
        self.size += len(data)

    def _gather(self, n: int) -> None:
        # Make the head chunk hold at least n unread bytes (n <= len(self)).
        parts = [self._head[self._pos :]]
        have = len(parts[0])
        while have < n:
            chunk = self._rest.popleft()
            parts.append(chunk)
            have += len(chunk)
        self._head, self._pos = b"".join(parts), 0

    def header(self, codec: HeaderCodec) -> tuple[int, ...] | None:
        """Unpack a fixed-size header at the read position without consuming it; None if not all here yet."""
        if len(self._head) - self._pos < codec.size:
            if self.size < codec.size:
                return None
            self._gather(codec.size)
        return codec.unpack_from(self._head, self._pos)

    def chunk(self) -> tuple[bytes, int]:
        """The chunk at the read position, and the position in it: a parser that reads many fixed-size headers
        in a row unpacks them straight from it, then skips what it took (``skip``) (within the chunk)."""
        return self._head, self._pos

    def peek(self, n: int) -> bytes:
        """The next n bytes (n <= len(self)) without consuming them."""
        if len(self._head) - self._pos < n:
            self._gather(n)
        return self._head[self._pos : self._pos + n]

    def skip(self, n: int) -> int:
        """Consume up to n bytes without looking at them; returns how many were consumed."""
        n = min(n, self.size)
        left = n
        while left:
            avail = len(self._head) - self._pos
            if left < avail:
                self._pos += left
                break
            left -= avail
            self._head = self._rest.popleft() if self._rest else b""
            self._pos = 0
        self.size -= n
        return n

    def take(self, n: int) -> memoryview:
        """Consume exactly n bytes (n <= len(self)) and return them, zero-copy when they lie in one chunk."""
        if len(self._head) - self._pos < n:
            self._gather(n)
        pos = self._pos
        view = memoryview(self._head)[pos : pos + n]
        self._pos = pos + n
        self.size -= n
        if self._pos == len(self._head) and self._rest:
            self._head, self._pos = self._rest.popleft(), 0
        return view

    def take_some(self, n: int) -> memoryview:
        """Consume at most n bytes, as many as the current chunk holds (at least one when any are unread):
        always zero-copy, for payloads handed on piece by piece."""
        if self._pos == len(self._head) and self._rest:
            self._head, self._pos = self._rest.popleft(), 0
        pos = self._pos
        n = min(n, len(self._head) - pos)
        view = memoryview(self._head)[pos : pos + n]
        self._pos = pos + n
        self.size -= n
        if self._pos == len(self._head) and self._rest:
            self._head, self._pos = self._rest.popleft(), 0
        return view

    def take_all(self) -> bytes:
        """Consume and return every unread byte (used when a phase ends with bytes left over)."""
        data = self.take(self.size).tobytes() if self.size else b""
        return data
