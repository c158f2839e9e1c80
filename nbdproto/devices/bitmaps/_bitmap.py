"""One dirty bitmap: which granules of an image were written, zeroed or trimmed since it started.

``DirtyBitmap.mark(offset, length)`` records a change before it is made. A granule already dirty costs a bit
test and nothing else (no lock, no I/O): that is the path nearly every write takes. A granule not yet dirty is
first made dirty in the store, durably, and only then in memory, so that no other write to that granule can
skip ahead of the store on the fast path. Writers that need the store at the same time share one store update
(group commit): the first becomes the committer and writes every granule waiting, the others wait for it. So
the first write to each granule pays for one durable update, shared with whatever else is waiting then, and
later writes to it pay nothing.

The in-memory bits are therefore never ahead of the store: after a crash the stored bitmap holds every granule
any write had started to change (and at most the granules of writes in flight that never reached the device:
the over-report is small). ``freeze`` copies the bits as they are (``FrozenBitmap``); a clear or a resize
replaces the stored record atomically (``BitmapStore``).
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from . import _bits
from ._store import BitmapSink, StoredBitmap

__all__ = [
    "DirtyBitmap",
    "FrozenBitmap",
    "BitmapInfo",
    "BitmapError",
    "DEFAULT_GRANULARITY",
    "MIN_GRANULARITY",
    "MAX_GRANULARITY",
    "CONTEXT_PREFIX",
    "check_name",
    "check_granularity",
]

DEFAULT_GRANULARITY = 64 << 10
"""qemu's default granularity (``qemu-img bitmap --add``, the QMP block-dirty-bitmap-add)."""
MIN_GRANULARITY = 4 << 10
MAX_GRANULARITY = 1 << 31
"""qemu's largest granularity."""
CONTEXT_PREFIX = "qemu:dirty-bitmap:"
"""The meta context of bitmap NAME is ``qemu:dirty-bitmap:NAME`` (qemu's docs/interop/nbd.rst): extents with
flag 1 are dirty, 0 clean."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
_FAILURES_KEPT = 1024


class BitmapError(ValueError):
    """A bitmap request that cannot be done as asked: a bad name or granularity, a name that exists already or
    does not exist. The message is one line, fit for a user."""


def check_name(name: str) -> str:
    """``name`` if it can name a bitmap, else BitmapError: 1 to 200 letters, digits and ``_ . + -``, not
    starting with ``.``, ``+`` or ``-`` (it names a file of the sidecar, and a meta context)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BitmapError(
            f"bitmap name {name!r} must be 1 to 200 letters, digits, '_', '.', '+' or '-', not starting with "
            "'.', '+' or '-'"
        )
    return name


def check_granularity(granularity: int) -> int:
    """``granularity`` if it is a power of two from 4 KiB to 2 GiB, else BitmapError."""
    if (
        not isinstance(granularity, int)
        or granularity & (granularity - 1)
        or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY
    ):
        raise BitmapError(f"bitmap granularity {granularity!r} must be a power of two from 4K to 2G")
    return granularity


@dataclass(frozen=True)
class BitmapInfo:
    """What ``bitmap_list`` says of a bitmap: its name, granularity and dirty bytes (the bytes of the image in
    dirty granules), and the meta context that serves it."""

    name: str
    granularity: int
    dirty_bytes: int
    size: int

    @property
    def context(self) -> str:
        return CONTEXT_PREFIX + self.name


class FrozenBitmap:
    """A bitmap's bits as they were at an instant (``DirtyBitmap.freeze``): they never change again."""

    def __init__(self, name: str, granularity: int, size: int, bits: bytearray) -> None:
        self.name, self.granularity, self.size = name, granularity, size
        self._shift = granularity.bit_length() - 1
        self._bits = bits

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Block status of ``qemu:dirty-bitmap:NAME`` as qemu-nbd answers it (``_bits.extents_of``)."""
        return _bits.extents_of(self._bits, self._shift, self.size, offset, length)

    def is_dirty(self, offset: int) -> bool:
        return _bits.is_set(self._bits, offset >> self._shift)

    def info(self) -> BitmapInfo:
        return BitmapInfo(self.name, self.granularity, _dirty_bytes(self._bits, self.granularity, self.size), self.size)


class DirtyBitmap:
    """The live bitmap ``name`` of an image of ``size`` bytes (see the module docstring).

    ``bits`` are the bits to start from (a stored bitmap; default: all clean); ``sink`` keeps the stored copy
    up to date (None: a bitmap kept in memory only). Thread-safe.
    """

    def __init__(
        self, name: str, granularity: int, size: int, bits: bytearray | None = None, sink: BitmapSink | None = None
    ) -> None:
        self.name = check_name(name)
        self.granularity = check_granularity(granularity)
        self._shift = granularity.bit_length() - 1
        self._size = size
        self._count = _bits.granule_count(size, granularity)
        self._bits = bits if bits is not None else bytearray(_bits.byte_count(self._count))
        if len(self._bits) != _bits.byte_count(self._count):
            raise ValueError(f"{len(self._bits)} bytes of bits do not cover {size} bytes in granules of {granularity}")
        self._sink = sink
        # What the store is being told while a commit runs: the bits plus the granules of that commit.
        self._staged = bytearray(self._bits) if sink is not None else bytearray()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting: list[tuple[int, int]] = []  # granule ranges for the next commit
        self._batch = 0  # the commit those ranges will be in
        self._committed = -1  # the last commit done
        self._committing = False
        self._failures: dict[int, OSError] = {}
        self._dirty = _bits.count_set(self._bits)

    @property
    def size(self) -> int:
        return self._size

    def probe(self) -> tuple[int, bytearray, int]:
        """(granule shift, the bits, granule count): what a caller needs to test whether one granule is dirty
        without a call (the filter's write path). The bits are changed in place, never replaced; the count only
        by ``resize``, after which the caller asks again."""
        return self._shift, self._bits, self._count

    def mark(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` is about to change, durably before returning (OSError when
        the store cannot record it: the change must then not be made). The part past the bitmap's size is the
        caller's to check (``resize``)."""
        if length <= 0:
            return
        shift = self._shift
        first = offset >> shift
        end = min(((offset + length - 1) >> shift) + 1, self._count)
        bits = self._bits
        if end - first == 1:
            if bits[first >> 3] >> (first & 7) & 1:
                return
        elif first >= end or _bits.all_set(bits, first, end):
            return
        self._mark_slowly([(first, end)])

    def mark_all(self, ranges: Sequence[tuple[int, int]]) -> None:
        """``mark`` for each (offset, length) of ``ranges``, in one store update for all of them."""
        shift, count = self._shift, self._count
        needed = []
        for offset, length in ranges:
            if length > 0:
                first, end = offset >> shift, min(((offset + length - 1) >> shift) + 1, count)
                if first < end and not _bits.all_set(self._bits, first, end):
                    needed.append((first, end))
        if needed:
            self._mark_slowly(needed)

    def _mark_slowly(self, ranges: list[tuple[int, int]]) -> None:
        with self._changed:
            ranges = [(first, end) for first, end in ranges if not _bits.all_set(self._bits, first, end)]
            if not ranges:
                return
            if self._sink is None:
                for first, end in ranges:
                    self._set_now(first, end)
                return
            self._waiting += ranges
            batch = self._batch
            while self._committed < batch:
                if self._committing:
                    self._changed.wait()
                else:
                    self._commit()
            failure = self._failures.get(batch)
            if failure is not None:
                raise OSError(failure.errno or errno.EIO, f"bitmap {self.name}: cannot record a change: {failure}")

    def _set_now(self, first: int, end: int) -> None:
        start, stop = first >> 3, ((end - 1) >> 3) + 1
        before = _bits.count_set(self._bits, start, stop)
        _bits.set_range(self._bits, first, end)
        self._dirty += _bits.count_set(self._bits, start, stop) - before

    def _commit(self) -> None:
        """Write every waiting granule to the store, then to memory. Called holding the lock, which is let go
        while the store works (one committer at a time: ``_committing``)."""
        assert self._sink is not None
        batch, ranges = self._batch, self._waiting
        self._batch, self._waiting, self._committing = batch + 1, [], True
        staged = self._staged
        spans = []
        for first, end in ranges:
            _bits.set_range(staged, first, end)
            spans.append((first >> 3, ((end - 1) >> 3) + 1))
        spans = _bits.merge_spans(spans)
        failure: OSError | None = None
        self._lock.release()
        try:
            self._sink.write(staged, spans)
        except OSError as exc:
            failure = exc
        finally:
            self._lock.acquire()
        bits = self._bits
        for start, stop in spans:
            if failure is None:
                before = _bits.count_set(bits, start, stop)
                bits[start:stop] = staged[start:stop]
                self._dirty += _bits.count_set(bits, start, stop) - before
            else:
                staged[start:stop] = bits[start:stop]
        if failure is not None:
            self._failures[batch] = failure
            for old in [b for b in self._failures if b < batch - _FAILURES_KEPT]:
                del self._failures[old]
        self._committed, self._committing = batch, False
        self._changed.notify_all()

    def _idle(self) -> None:
        """Wait (holding the lock) until no commit runs."""
        while self._committing:
            self._changed.wait()

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Block status of ``qemu:dirty-bitmap:NAME`` as qemu-nbd answers it (``_bits.extents_of``)."""
        with self._lock:
            return _bits.extents_of(self._bits, self._shift, self._size, offset, length)

    def is_dirty(self, offset: int) -> bool:
        return _bits.is_set(self._bits, offset >> self._shift)

    def info(self) -> BitmapInfo:
        with self._lock:
            dirty = self._dirty * self.granularity
            if self._count and _bits.is_set(self._bits, self._count - 1):
                dirty -= self._count * self.granularity - self._size
            return BitmapInfo(self.name, self.granularity, dirty, self._size)

    def freeze(self) -> FrozenBitmap:
        """The bits as they are now, in a copy that never changes (marks in progress that have not reached the
        store are not in it: their writes have not started either)."""
        with self._lock:
            return FrozenBitmap(self.name, self.granularity, self._size, bytearray(self._bits))

    def record(self) -> StoredBitmap:
        with self._lock:
            return StoredBitmap(self.name, self.granularity, self._size, bytearray(self._bits))

    def clear(self) -> None:
        """Every granule clean again, in the store first (atomically). The caller makes sure no write is in
        flight (the filter's ``quiesced``)."""
        with self._changed:
            self._idle()
            empty = bytearray(len(self._bits))
            if self._sink is not None:
                self._sink.replace(StoredBitmap(self.name, self.granularity, self._size, empty))
            self._bits[:] = empty
            self._staged[:] = empty
            self._dirty = 0

    def resize(self, size: int) -> None:
        """Cover ``size`` bytes: what a grown image gains is dirty (it was not there when the bitmap started),
        what a shrunk one loses is forgotten. Stored first, atomically."""
        with self._changed:
            self._idle()
            if size == self._size:
                return
            count = _bits.granule_count(size, self.granularity)
            bits = bytearray(self._bits[: _bits.byte_count(count)])
            bits.extend(bytes(_bits.byte_count(count) - len(bits)))
            if size > self._size:
                _bits.set_range(bits, self._size >> self._shift, count)
            elif count & 7:
                bits[-1] &= (1 << (count & 7)) - 1
            if self._sink is not None:
                self._sink.replace(StoredBitmap(self.name, self.granularity, size, bytearray(bits)))
            # In place: the fast path of writers running now reads the same array, old bytes or new.
            self._bits[:] = bits
            self._staged[:] = bits if self._sink is not None else b""
            self._size, self._count = size, count
            self._dirty = _bits.count_set(bits)


def _dirty_bytes(bits: bytearray, granularity: int, size: int) -> int:
    count = _bits.granule_count(size, granularity)
    dirty = _bits.count_set(bits) * granularity
    if count and _bits.is_set(bits, count - 1):
        dirty -= count * granularity - size
    return dirty
