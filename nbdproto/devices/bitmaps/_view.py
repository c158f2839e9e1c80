"""BackupView: an export as it was at a checkpoint, read-only, while the export itself goes on taking writes.

qemu's pull-mode backup with fleecing (libvirt's ``backup-begin``), for any device: a checkpoint freezes a view
of the export at an instant between two requests (``DirtyBitmapFilter.checkpoint``), which a server offers as
an export of its own (``EXPORT@NAME``) for a backup to read at leisure. Nothing is copied when it starts. The
view reads each granule from the live device until something is about to change it; then, before the change
reaches the device, the bitmap filter calls ``before_change`` and the granule's old bytes are copied aside
(copy-before-write, into an ``AsideStore``), and read from there from then on. A granule that reads as zero is
only noted as zero: nothing is kept for it.

Reads of the view and copies into it are ordered by a lock on byte ranges (``RegionLocks``, each range held
exclusive): a read holds its range while it looks which granules are where and reads them, a copy holds the granules
it copies, so a read never sees a granule half way between the two places, and reads of different ranges go on side
by side.

What a view keeps aside is bounded by its ``limit`` (bytes). When a copy would exceed it, or the store fails
(a full disk), or the live device cannot be read, the view **breaks** rather than fail the client's write
(the backup fails, not the guest: qemu's ``on-cbw-error=break-snapshot``): from then on every read of it
fails with EIO and a message that says why, it copies nothing more, and ``status`` says it broke.

The view offers ``base:allocation`` when the device does (a copied granule is data, or zero where it read as
zero) and, for a checkpoint taken ``since`` an older one, that older bitmap frozen at the same instant as
``qemu:dirty-bitmap:OLD``: what changed between the two checkpoints.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nbdproto.devices import RegionLocks
from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities, Dispatch, dispatch_of
from nbdproto.wire import BASE_ALLOCATION, AllocationState

from . import _bits
from ._aside import AsideStore
from ._bitmap import CONTEXT_PREFIX, FrozenBitmap

__all__ = ["BackupView", "ViewStatus"]

_READ_AT_ONCE = 4 << 20  # a copy-before-write reads the live device in pieces of at most this many bytes
_ZERO = int(AllocationState.ZERO)
_HOLE_OR_ZERO = int(AllocationState.HOLE | AllocationState.ZERO)


@dataclass(frozen=True)
class ViewStatus:
    """What ``status`` says of a view: its checkpoint, the bitmap it offers (``since``), its size and granule,
    what it holds aside (``copied_bytes`` of at most ``limit``, ``where``), and whether it ``broke`` (why)."""

    name: str
    since: str | None
    size: int
    granularity: int
    copied_bytes: int
    zero_granules: int
    limit: int
    where: str
    created: float
    broken: str | None


class BackupView:
    """The device below a bitmap filter (``live``) as it is now, frozen (see the module docstring); made by
    ``DirtyBitmapFilter.checkpoint`` inside its ``quiesced()``.

    ``size``: the export's size at the checkpoint; ``granularity``: the unit copied aside (a power of two);
    ``aside``: where copies go (closed with the view); ``limit``: the most bytes kept there; ``since``: the
    older bitmap frozen at the checkpoint, offered as its context.
    """

    def __init__(
        self,
        name: str,
        live: BlockDevice,
        size: int,
        granularity: int,
        aside: AsideStore,
        limit: int,
        since: FrozenBitmap | None = None,
    ) -> None:
        self.name = name
        self.live = live
        self.size = size
        self.granularity = granularity
        self.since = since
        self._shift = granularity.bit_length() - 1
        self._count = _bits.granule_count(size, granularity)
        self._needed = bytearray(_bits.byte_count(self._count))  # 1: still read from the live device
        _bits.set_range(self._needed, 0, self._count)
        self._zero = bytearray(len(self._needed))  # 1: copied, and it read as zero (nothing kept)
        self._bit_lock = threading.Lock()  # bits of one byte may be changed by copies of different ranges
        self._regions = RegionLocks()
        self._aside = aside
        self._limit = limit
        self._copied = 0
        self._zeroes = 0
        self._closing = False
        self.broken: str | None = None
        self.created = time.time()
        inner = live.capabilities
        self._base_allocation = BASE_ALLOCATION in inner.meta_contexts
        contexts: tuple[str, ...] = (BASE_ALLOCATION,) if self._base_allocation else ()
        if since is not None:
            contexts += (CONTEXT_PREFIX + since.name,)
        self.capabilities = DeviceCapabilities(
            can_write=False,
            can_fua=False,
            can_multi_conn=True,
            minimum_block_size=inner.minimum_block_size,
            preferred_block_size=inner.preferred_block_size,
            maximum_payload=inner.maximum_payload,
            meta_contexts=contexts,
        )
        self.dispatch: Dispatch = _slower(dispatch_of(live), aside.dispatch)

    # --- The write side: called by the filter before a change reaches the live device -----------------------

    def needs_copy(self, offset: int, length: int) -> bool:
        """Whether a change of ``[offset, offset + length)`` would copy anything aside now."""
        end = min(offset + length, self.size)
        if offset >= end or self.broken is not None:
            return False
        last = ((end - 1) >> self._shift) + 1
        return _bits.next_with(self._needed, offset >> self._shift, last, True) < last

    def before_change(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` of the live device is about to change: copy aside every granule of it
        the view still reads from there. Never raises: what cannot be copied breaks the view."""
        end = min(offset + length, self.size)
        if offset >= end or self.broken is not None:
            return
        shift, needed = self._shift, self._needed
        first, last = offset >> shift, ((end - 1) >> shift) + 1
        if first + 1 == last:
            if not needed[first >> 3] >> (first & 7) & 1:
                return
        elif _bits.next_with(needed, first, last, True) >= last:
            return
        start = first << shift
        with self._regions.exclusive(start, min(last << shift, self.size)):
            if self.broken is not None or self._closing:
                return
            try:
                self._copy_aside(first, last)
            except Exception as exc:  # the live device or the store failed: the backup fails, not the write
                self._break(f"copying granules aside failed: {exc}")

    def _copy_aside(self, first: int, last: int) -> None:
        """Copy the needed granules of ``[first, last)`` aside (the caller holds their range)."""
        shift, needed = self._shift, self._needed
        index = _bits.next_with(needed, first, last, True)
        while index < last:
            stop = min(_bits.next_with(needed, index, last, False), index + max(1, _READ_AT_ONCE >> shift))
            start, end = index << shift, min(stop << shift, self.size)
            buffer = memoryview(bytearray(end - start))
            self.live.pread_into(buffer, start)
            for granule in range(index, stop):
                piece = buffer[(granule - index) << shift : min((granule - index + 1) << shift, end - start)]
                if piece.tobytes() == bytes(len(piece)):
                    self._settle(granule, zero=True)
                    continue
                if not self._reserve(len(piece)):
                    self._break(f"it would hold more than its limit of {self._limit} bytes aside")
                    return
                self._aside.put(granule, piece)
                self._settle(granule, zero=False)
            index = _bits.next_with(needed, stop, last, True)

    def _reserve(self, count: int) -> bool:
        """Count ``count`` more bytes aside, if the limit allows (copies of different ranges run at once)."""
        with self._bit_lock:
            if self._copied + count > self._limit:
                return False
            self._copied += count
            return True

    def _settle(self, granule: int, *, zero: bool) -> None:
        """Granule ``granule`` is read from aside from now on (or as zeros)."""
        byte, bit = granule >> 3, 1 << (granule & 7)
        with self._bit_lock:
            if zero:
                self._zero[byte] |= bit
                self._zeroes += 1
            self._needed[byte] &= ~bit & 0xFF

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = f"backup view {self.name!r} broke: {reason}"

    # --- The read side: a read-only device -----------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if self._closing:
            raise OSError(errno.EIO, f"backup view {self.name!r} was released")
        if self.broken is not None:
            raise OSError(errno.EIO, self.broken)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset}+{length} is outside the view's {self.size} bytes")

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        self._check(offset, length)
        if not length:
            return
        with self._regions.exclusive(offset, offset + length):
            self._check(offset, length)  # it may have broken, or been released, while the range was held
            for start, end, where in self._runs(offset, offset + length):
                part = buffer[start - offset : end - offset]
                if where == "live":
                    self.live.pread_into(part, start)
                elif where == "zero":
                    part[:] = bytes(len(part))
                else:
                    self._aside.read_into(start >> self._shift, start & (self.granularity - 1), part)

    def _runs(self, offset: int, end: int) -> list[tuple[int, int, str]]:
        """``[offset, end)`` as (start, end, where) runs: "live" (still on the live device, a run of granules),
        "zero", or "aside" (one granule each)."""
        shift, needed, zero = self._shift, self._needed, self._zero
        out: list[tuple[int, int, str]] = []
        position = offset
        while position < end:
            granule = position >> shift
            if _bits.is_set(needed, granule):
                stop = min(_bits.next_with(needed, granule, ((end - 1) >> shift) + 1, False) << shift, end)
                out.append((position, stop, "live"))
            else:
                stop = min((granule + 1) << shift, end)
                out.append((position, stop, "zero" if _bits.is_set(zero, granule) else "aside"))
            position = stop
        return out

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        """Block status as of the checkpoint: the older bitmap (frozen), or base:allocation (the live device's
        for granules not yet copied aside; data for those copied, zero for those that read as zero)."""
        self._check(offset, length)
        if self.since is not None and context == CONTEXT_PREFIX + self.since.name:
            return self.since.extents(offset, length)
        if context != BASE_ALLOCATION or not self._base_allocation:
            raise OSError(errno.EINVAL, f"backup view {self.name!r} offers no meta context {context!r}")
        out: list[tuple[int, int]] = []
        end = min(offset + length, self.size)
        with self._regions.exclusive(offset, end):
            self._check(offset, length)
            for start, stop, where in self._runs(offset, end):
                if where == "live":
                    found = self._live_extents(start, stop)
                    _append(out, found)
                    if sum(n for n, _ in found) < stop - start:
                        break  # the device answered for less: so do we
                else:
                    _append(out, [(stop - start, _ZERO if where == "zero" else 0)])
        return out

    def _live_extents(self, start: int, stop: int) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        position = start
        for length, flags in self.live.extents(BASE_ALLOCATION, start, stop - start):
            length = min(int(length), stop - position)
            if length <= 0:
                break
            found.append((length, int(flags) & _HOLE_OR_ZERO))
            position += length
        return found

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        raise OSError(errno.EPERM, f"backup view {self.name!r} is read-only")

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        raise OSError(errno.EPERM, f"backup view {self.name!r} is read-only")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.EPERM, f"backup view {self.name!r} is read-only")

    def flush(self) -> None:
        pass

    def cache(self, offset: int, length: int) -> None:
        pass

    # --- Its life -------------------------------------------------------------------------------------------

    def status(self) -> ViewStatus:
        return ViewStatus(
            self.name,
            None if self.since is None else self.since.name,
            self.size,
            self.granularity,
            self._copied,
            self._zeroes,
            self._limit,
            self._aside.where,
            self.created,
            self.broken,
        )

    def close(self) -> None:
        """End the view (``DirtyBitmapFilter.release``): reads fail from now on, and once those in progress are
        done, what it holds aside is freed. Idempotent."""
        if self._closing:
            return
        self._closing = True
        with self._regions.exclusive(0, max(self.size, 1)):  # every read and copy in progress has finished
            self._aside.close()
            self._copied = 0


def _append(out: list[tuple[int, int]], runs: Sequence[tuple[int, int]]) -> None:
    """Add ``runs`` to ``out``, a run of the same flags as the last merged into it."""
    for length, flags in runs:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))


_ORDER = {"inline": 0, "batch": 1, "threads": 2}


def _slower(first: Dispatch, second: Dispatch) -> Dispatch:
    return first if _ORDER[first] >= _ORDER[second] else second
