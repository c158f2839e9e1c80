"""RegionLock: exclusive locks on byte ranges of a device, for the mirror.

The mirror's background copy reads a range of the primary and writes it to the secondary; a client write to
the same range in between would land on the secondary first and then be overwritten with the older bytes the
copy read (the race the seed library's Region_lock prevents). Holding the range while the copy reads and
writes it, and while a client writes it to both sides, orders the two. Two client writes to the same range
are ordered the same way, so both sides see them land in the same order.

Ranges that do not overlap never wait for each other. The held ranges are few (one per request being
carried out), so a list is searched; waiters sleep on one condition and look again whenever a range is let go.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["RegionLock", "LockObserver"]


class LockObserver(Protocol):
    """Told what waits (for tests that schedule threads around the lock). Called with the lock's mutex held:
    it must not call back into the lock."""

    def waiting(self) -> None:
        """The calling thread is about to sleep until a range is released."""

    def released(self) -> None:
        """A range was let go: every sleeping thread is woken to look again."""


class RegionLock:
    """Exclusive locks on [offset, offset + length) ranges; see the module docstring."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int]] = []
        self._sleepers = 0
        self.observer: LockObserver | None = None

    def acquire(self, offset: int, length: int) -> tuple[int, int]:
        """Wait until no held range overlaps [offset, offset + length), hold it, and return its token."""
        end = offset + max(length, 1)  # an empty range still orders against one that covers its offset
        with self._changed:
            while any(start < end and offset < stop for start, stop in self._held):
                if self.observer is not None:
                    self.observer.waiting()
                self._sleepers += 1
                try:
                    self._changed.wait()
                finally:
                    self._sleepers -= 1
            token = (offset, end)
            self._held.append(token)
            return token

    def release(self, token: tuple[int, int]) -> None:
        """Let go of a range ``acquire`` returned."""
        with self._changed:
            self._held.remove(token)
            if self.observer is not None:
                self.observer.released()
            if self._sleepers:
                self._changed.notify_all()

    @contextmanager
    def hold(self, offset: int, length: int) -> Iterator[None]:
        """The range held for the duration of a ``with`` block."""
        token = self.acquire(offset, length)
        try:
            yield
        finally:
            self.release(token)
