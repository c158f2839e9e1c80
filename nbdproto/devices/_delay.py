"""DelayFilter: make chosen commands slow, to see how a client copes with a slow or distant server.

Each command kind has its own delay (seconds): ``read``, ``write``, ``zero`` (write-zeroes, fast or not),
``trim``, ``flush``, ``extents`` (block status) and ``cache``. The filter sleeps that long, then passes the
call on, like nbdkit's delay filter. A command with no delay is not touched at all (its call goes straight to
the inner device; with no read delay, read views and sendfile too), so a delay filter at zero costs nothing.

Delayed requests sleep in the thread that carries them out, so the filter asks servers for a thread per
request (``dispatch = "threads"``) as soon as any delay is set: requests then overlap as they would on a slow
disk, and an event loop never sleeps. Capabilities are the inner device's: a delay filter over a read-only
device stays read-only. Thread-safe and multi-conn safe whenever the inner device is (it keeps no state).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from nbdproto.serving import BlockDevice, Buffer

from ._filter import FILTER_COMMANDS, Filter

__all__ = ["DelayFilter", "DELAYED_COMMANDS"]

DELAYED_COMMANDS = FILTER_COMMANDS
"""The command names a delay is given for, and the device call each one delays."""


class DelayFilter(Filter):
    """``inner`` with each command kind delayed by the seconds given for it (0: not delayed)."""

    def __init__(
        self,
        inner: BlockDevice,
        *,
        read: float = 0.0,
        write: float = 0.0,
        zero: float = 0.0,
        trim: float = 0.0,
        flush: float = 0.0,
        extents: float = 0.0,
        cache: float = 0.0,
    ) -> None:
        super().__init__(inner)
        self.delays = {"read": read, "write": write, "zero": zero, "trim": trim, "flush": flush}
        self.delays.update(extents=extents, cache=cache)
        for command, seconds in self.delays.items():
            if not (seconds >= 0 and seconds < float("inf")):
                raise ValueError(f"{command} delay {seconds!r} must be a finite number of seconds >= 0")
        self._pass_through(*(DELAYED_COMMANDS[command] for command, seconds in self.delays.items() if not seconds))
        if any(self.delays.values()):
            self.dispatch = "threads"

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        time.sleep(self.delays["read"])
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        time.sleep(self.delays["write"])
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        time.sleep(self.delays["flush"])
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        time.sleep(self.delays["trim"])
        self.inner.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        time.sleep(self.delays["zero"])
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        time.sleep(self.delays["cache"])
        self.inner.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        time.sleep(self.delays["extents"])
        return self.inner.extents(context, offset, length)
