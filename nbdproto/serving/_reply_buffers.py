"""ReplyBuffers: read replies' buffers used again once they are sent, on connections that send copies anyway,
and for devices that read into the server's buffers (a remote export in a pipeline: ``pipelined_batch`` hands a
kept buffer to each read, ``pipeline_sent`` keeps it again).

On a TLS connection a read's data is encrypted from a buffer the server fills (a device's views of a file
mapping may not be touched from user space: a file truncated under the server would be a SIGBUS). A buffer
of its own for every read (``bytearray(length)``) costs more than the read itself at 256 KiB: the allocator
hands large blocks back to the kernel when they are freed, so each new one is page faults, each page zeroed by
the kernel and zeroed again by bytearray (about a sixth of the server's CPU for nbdcopy's reads over TLS:
bench/bench_tls.py). Here the buffers of the replies sent are kept, by size, and filled again for the next
reads of that size, as nbdkit keeps a buffer per thread.

What is kept is bounded per connection (as nbdkit keeps a buffer per thread, sixteen threads per connection):
what one send of queued replies holds (FLUSH_AT) and a MiB more, so that every buffer of the replies sent
together is filled again by the next ones. Keeping fewer did not help: the allocator gives the rest back to
the kernel at each send, and the next reads fault it in again. A pipelined connection that is busy may keep
more: as much as it has had in flight since it was last cut back, less what is in flight now (``busy``, and
``keep``'s ``in_flight``), so that a client with many big reads in flight (nbdcopy: 16 MiB a connection) has
them filled into buffers kept from its earlier replies, while the connection never holds more than it held
at its busiest; what is kept beyond the bound above is let go (``cut_back``) once nothing is in flight and
another connection is about to wait for memory (both servers: their connections answer a client's round of
requests before its next round arrives, so they go idle between rounds, and cutting back at every idle moment
gave a tenth to a sixth of nbdcopy's reads through a threads proxy new buffers). A
proxy's CPU for nbdcopy's reads: 16% less on the threads server, 13% on anyio's (fourteen rounds of
bench/bench_proxy.sh; shorter runs moved by a tenth). And it is memory the server holds, so it is held from
the connection's share of the server's memory budget (nbdproto.serving.MemoryBudget), as queued replies are:
many idle connections that once read big keep no more than the budget allows, a buffer that the share cannot
hold is let go, and ``release`` gives everything kept back (the session calls it before it would wait for
budget, so kept buffers never stand in the way of a read).
"""

from __future__ import annotations

from typing import Any

from ._budget import MemoryShare
from ._steps import FLUSH_AT

__all__ = ["ReplyBuffers", "KEPT_REPLY_BYTES"]

KEPT_REPLY_BYTES = FLUSH_AT + (1 << 20)
"""The most a connection's ReplyBuffers keep between replies (module docstring)."""


class ReplyBuffers:
    """Buffers for the data of read replies, used again once the replies are sent (module docstring)."""

    __slots__ = ("_free", "_used", "_limit", "_kept", "_share", "_handed", "_peak")

    def __init__(self, limit: int = KEPT_REPLY_BYTES, share: MemoryShare | None = None) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._used: list[bytearray] = []
        self._limit = limit
        self._kept = 0  # bytes in _free, held from ``share``
        self._share = share
        self._handed: bytearray | None = None  # hand_over's buffer, for the reader's next read
        self._peak = 0  # the most a pipelined connection has had in flight since the last cut_back (``busy``)

    def take(self, length: int) -> bytearray:
        """A buffer of ``length`` bytes for a read whose budget is taken: one kept (``kept_for``), or a new one."""
        return self.kept_for(length) or bytearray(length)

    def kept_for(self, length: int) -> bytearray | None:
        """A buffer of ``length`` bytes kept from a reply already sent, for a read whose budget is taken (what
        the buffer held of the share goes back: the read holds its own); None when none is kept."""
        buffer = self.held_for(length)
        if buffer is not None and self._share is not None:
            self._share.give(length)
        return buffer

    def held_for(self, length: int) -> bytearray | None:
        """A buffer of ``length`` bytes kept from a reply already sent, handed over with the share of memory it
        holds (``length`` bytes: a read's cost), for a read that has not taken its budget: it holds that share
        from now on. None when none is kept."""
        kept = self._free.get(length)
        if not kept:
            return None
        self._kept -= length
        return kept.pop()

    def hand_over(self, length: int) -> bool:
        """Set a kept buffer of ``length`` bytes aside for the next read of ``reader``, with the share of memory it
        holds: that read's budget (a read costs its length), which the read then does not take itself (a take
        and a give of the share less a request). False when none is kept: the read takes its budget, and the
        reader a buffer from ``take``."""
        self._handed = buffer = self.held_for(length)
        return buffer is not None

    def reader(self, device: Any) -> Any:
        """A ReadView for ``device`` (nbdproto.serving's ``carry_out`` takes it): each read's bytes, read with
        ``pread_into`` into the buffer ``hand_over`` set aside for it, else one from ``take``; ``sent`` keeps it
        again."""
        used, take = self._used, self.take

        def read(offset: int, length: int) -> bytearray:
            buffer = self._handed
            if buffer is None:
                buffer = take(length)
            else:
                self._handed = None
            used.append(buffer)
            device.pread_into(memoryview(buffer), offset)
            return buffer

        return read

    def sent(self) -> None:
        """Every reply made so far from ``reader``'s buffers is sent: keep them for reads to come."""
        self.keep(self._used)
        self._used.clear()

    def busy(self, in_flight: int) -> None:
        """A pipelined connection has ``in_flight`` bytes of requests being carried out (its request budget's
        bytes): until the next ``cut_back``, ``keep`` may keep as much as the most it has had in flight."""
        if in_flight > self._peak:
            self._peak = in_flight

    def keep(self, buffers: list[bytearray], in_flight: int = 0) -> None:
        """The replies of ``buffers`` are sent: keep them for reads to come, as many as ``limit`` (or, on a busy
        pipelined connection with ``in_flight`` bytes still in flight, what ``busy`` saw at most less those) and
        the share allow. Nothing is let go here, even with nothing in flight: a client's next round of requests
        wants these buffers; ``cut_back`` does it when the memory is wanted."""
        room = max(self._limit, self._peak - in_flight) - self._kept
        lengths = list(map(len, buffers))
        total = sum(lengths)
        keep = buffers
        if total > room:  # as many as fit, in order
            keep, total = [], 0
            for buffer, length in zip(buffers, lengths, strict=True):
                if length <= room - total:
                    keep.append(buffer)
                    total += length
        if not total or (self._share is not None and not self._share.try_take(total)):
            return
        free = self._free
        if keep is buffers and lengths.count(lengths[0]) == len(lengths):  # all of one size (a client's usual)
            free.setdefault(lengths[0], []).extend(buffers)
        else:
            for buffer in keep:
                free.setdefault(len(buffer), []).append(buffer)
        self._kept += total

    def cut_back(self) -> None:
        """The connection is idle and another wants the memory: let go of kept buffers until what is kept is
        within ``limit``, giving back the share they held (``busy`` starts again from nothing)."""
        self._peak = 0
        excess = self._kept - self._limit
        if excess <= 0:
            return
        freed = 0
        for kept in self._free.values():
            while kept and freed < excess:
                freed += len(kept.pop())
        self._kept -= freed
        if self._share is not None:
            self._share.give(freed)

    def release(self) -> None:
        """Let go of the buffers kept, and give back the budget they held (the connection is over, or needs the
        budget for reads); those of unsent replies stay theirs."""
        if self._share is not None and self._kept:
            self._share.give(self._kept)
        self._free.clear()
        self._kept = 0

    @property
    def kept(self) -> int:
        """Bytes kept for reads to come."""
        return self._kept
