"""Shared and exclusive locks on byte ranges of a device, for filters that read, modify and write back.

A read-modify-write of a block (a partial write through the blocksize filter, the first write to a block of a
cow overlay) must not interleave with any other write to that block, or one of the two is lost: the
read-modify-write would put back the old bytes of the other. Plain writes need not exclude each other (NBD
leaves the order of concurrent overlapping writes open), only such read-modify-writes. So writers hold their
range shared, and a read-modify-write holds its block exclusive: it waits for every writer of an overlapping
range, and they for it. A caller holds one range at a time, so there is no lock order to get wrong.

The ranges held are few (one per request being carried out), so a list scanned under one condition is enough.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

__all__ = ["RegionLocks"]


class RegionLocks:
    """Byte ranges held shared (by plain writers) or exclusive (by read-modify-writes)."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._held: list[tuple[int, int, bool]] = []

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(s < end and start < e and (exclusive or x) for s, e, x in self._held)

    @contextmanager
    def _hold(self, start: int, end: int, exclusive: bool) -> Iterator[None]:
        entry = (start, end, exclusive)
        with self._changed:
            while self._conflicts(start, end, exclusive):
                self._changed.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._changed:
                self._held.remove(entry)
                self._changed.notify_all()

    def shared(self, start: int, end: int) -> AbstractContextManager[None]:
        """Hold [start, end) against read-modify-writes (other shared holders may overlap)."""
        return self._hold(start, end, False)

    def exclusive(self, start: int, end: int) -> AbstractContextManager[None]:
        """Hold [start, end) alone: no other holder overlaps it until released."""
        return self._hold(start, end, True)
