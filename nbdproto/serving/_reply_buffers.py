"""ReplyBuffers: read replies' buffers used again once they are sent, on connections that send copies anyway.

On a TLS connection a read's data is encrypted from a buffer the server fills (a device's views of a file
mapping may not be touched from user space: a file truncated under the server would be a SIGBUS). A buffer
of its own for every read (``bytearray(length)``) costs more than the read itself at 256 KiB: the allocator
hands large blocks back to the kernel when they are freed, so each new one is page faults, each page zeroed by
the kernel and zeroed again by bytearray (about a sixth of the server's CPU for nbdcopy's reads over TLS:
bench/bench_tls.py). Here the buffers of the replies sent are kept, by size, and filled again for the next
reads of that size, as nbdkit keeps a buffer per thread.

What is kept is bounded, for the connection's life (as nbdkit keeps a buffer per thread, sixteen threads per
connection): what one send of queued replies holds (FLUSH_AT) and a MiB more, so that every buffer of the
replies sent together is filled again by the next ones. Keeping fewer did not help: the allocator gives the
rest back to the kernel at each send, and the next reads fault it in again.
"""

from __future__ import annotations

from typing import Any

from ._steps import FLUSH_AT

__all__ = ["ReplyBuffers", "KEPT_REPLY_BYTES"]

KEPT_REPLY_BYTES = FLUSH_AT + (1 << 20)
"""The most a connection's ReplyBuffers keep between replies (module docstring)."""


class ReplyBuffers:
    """Buffers for the data of read replies, used again once the replies are sent (module docstring)."""

    __slots__ = ("_free", "_used", "_limit", "_kept")

    def __init__(self, limit: int = KEPT_REPLY_BYTES) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._used: list[bytearray] = []
        self._limit = limit
        self._kept = 0  # bytes in _free

    def reader(self, device: Any) -> Any:
        """A ReadView for ``device`` (nbdproto.serving's ``carry_out`` takes it): each read's bytes, read with
        ``pread_into`` into a buffer kept from a reply already sent, or a new one."""
        free, used = self._free, self._used

        def read(offset: int, length: int) -> bytearray:
            kept = free.get(length)
            if kept:
                buffer = kept.pop()
                self._kept -= length
            else:
                buffer = bytearray(length)
            used.append(buffer)
            device.pread_into(memoryview(buffer), offset)
            return buffer

        return read

    def sent(self) -> None:
        """Every reply made so far is sent: its buffer may be filled again (as many as ``limit`` allows)."""
        free, limit = self._free, self._limit
        for buffer in self._used:
            size = len(buffer)
            if self._kept + size <= limit:
                free.setdefault(size, []).append(buffer)
                self._kept += size
        self._used.clear()

    def release(self) -> None:
        """Let go of the buffers kept (the connection is over); those of unsent replies stay theirs."""
        self._free.clear()
        self._kept = 0

    @property
    def kept(self) -> int:
        """Bytes kept for reads to come."""
        return self._kept
