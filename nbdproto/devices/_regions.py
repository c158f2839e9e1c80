"""Shared and exclusive locks on byte ranges of a device: the one range lock every device and filter uses.

- Filters that read, modify and write back (a partial write through the blocksize filter, the first write to a
  block of a cow overlay) must not interleave with any other write to that block, or one of the two is lost:
  the read-modify-write would put back the old bytes of the other. Plain writes need not exclude each other
  (NBD leaves the order of concurrent overlapping writes open), only such read-modify-writes. So writers hold
  their range shared, and a read-modify-write holds its block exclusive.
- The mirror's background copy reads a range of the primary and writes it to the secondary; a client write to
  the same range in between would land on the secondary first and then be overwritten with the older bytes the
  copy read. The copy and the client writes hold their ranges exclusive, which orders them, and orders two
  client writes to one range alike on both sides.

Ranges that do not conflict never wait for each other; an empty range still orders against one that covers
its offset. The ranges held are few (one per request being carried out), so a list scanned under one condition
is enough. A caller holds one range at a time, so there is no lock order to get wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

__all__ = ["RegionLocks", "LockObserver"]

Token = tuple[int, int, bool]


class LockObserver(Protocol):
    """Told what waits (for tests that schedule threads around the lock). Called with the lock's mutex held:
    it must not call back into the lock."""

    def waiting(self) -> None:
        """The calling thread is about to sleep until a range is released."""

    def released(self) -> None:
        """A range was let go: every sleeping thread is woken to look again."""


class RegionLocks:
    """Byte ranges [start, end) held shared (by plain writers) or exclusive (by read-modify-writes, the
    mirror's copy and writes); see the module docstring."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._held: list[Token] = []
        self._sleepers = 0
        self.observer: LockObserver | None = None

    def acquire(self, start: int, end: int, *, exclusive: bool = True) -> Token:
        """Wait until no held range conflicts with [start, end), hold it, and return its token."""
        token = (start, max(end, start + 1), exclusive)
        with self._changed:
            while any(s < token[1] and start < e and (exclusive or x) for s, e, x in self._held):
                if self.observer is not None:
                    self.observer.waiting()
                self._sleepers += 1
                try:
                    self._changed.wait()
                finally:
                    self._sleepers -= 1
            self._held.append(token)
            return token

    def release(self, token: Token) -> None:
        """Let go of a range ``acquire`` returned."""
        with self._changed:
            self._held.remove(token)
            if self.observer is not None:
                self.observer.released()
            if self._sleepers:
                self._changed.notify_all()

    @contextmanager
    def _hold(self, start: int, end: int, exclusive: bool) -> Iterator[None]:
        token = self.acquire(start, end, exclusive=exclusive)
        try:
            yield
        finally:
            self.release(token)

    def shared(self, start: int, end: int) -> AbstractContextManager[None]:
        """Hold [start, end) against exclusive holders (other shared holders may overlap)."""
        return self._hold(start, end, False)

    def exclusive(self, start: int, end: int) -> AbstractContextManager[None]:
        """Hold [start, end) alone: no other holder overlaps it until released."""
        return self._hold(start, end, True)
