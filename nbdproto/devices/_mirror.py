"""MirrorDevice: serve a primary device while building a copy of it on a secondary, then keep the two in step.

Reads come from the primary; a write goes to the primary, then to the secondary, and is acknowledged after both; a
background copy walks the primary from start to end, reporting each percent and then "complete"; from then on the
mirror is synchronous. A region lock (``RegionLocks``, each range held exclusive) keeps the copy from overwriting
newer data on the secondary with older data: without it, the copy could read block N, a client write block N on both
sides, and the copy then write its old block N.

And:

- The copy is sparse-aware: the primary's holes (``base:allocation``) become write-zeroes on the secondary
  (which may punch holes), never data, and are skipped altogether on a secondary known to read as zero. Block
  status on some devices costs in proportion to the device rather than the range asked for (SEEK_HOLE on a
  full file walks its page cache to the end), so the copy asks once per large window without any lock and
  trusts the answer for every piece no client has changed since; a piece a client changed is asked about
  again while its range is held, where the answer is exact.
- Several pieces are in flight at once (``requests`` copy threads, each holding the range it copies).
- Trims and zeroes are mirrored as trims and zeroes; FUA and flush reach both sides (FUA as a write then a
  flush on a side that has flush but not FUA).
- A failure of the secondary (or of reading the primary) during the copy stops the copy; it is reported
  through the callback ("failed: reason") and ``status()`` (MirrorState.FAILED and the reason), and every
  later write fails with EIO rather than let the two sides silently diverge. Reads keep working: the primary is intact.
- A secondary that stalls fails the same way once its own time limit runs out (``NbdDevice``'s ``timeout``:
  ``nbdproto mirror --remote-timeout``): a write waits at most that long for it, a flush (at a client's
  disconnect, at ``close()``) too, and reads never wait for it. Once failed, the mirror asks nothing more of
  the secondary, so nothing waits on it again.
- ``status()``: the state (``MirrorState``), why it failed if it did, bytes copied and the rate.

The secondary may be any device, a remote NBD export (``NbdDevice``) included. The mirror owns both devices:
``close()`` stops the copy and closes them.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Sequence

from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities, Dispatch, dispatch_of
from nbdproto.wire import BASE_ALLOCATION, STATUS_SPAN

from ._mirrorsides import runs_of, trim_side, write_side, zero_side
from ._mirrorstatus import MirrorState, MirrorStatus, Progress
from ._regions import RegionLocks

__all__ = ["MirrorDevice", "MirrorState", "MirrorStatus", "Progress"]

log = logging.getLogger("nbdproto.devices.mirror")

ZERO_SPAN = 1 << 30
"""The largest hole handed to the secondary as one write-zeroes."""
_MARK_BLOCKS = 1 << 20
"""At most this many blocks in the map of what clients changed during the copy (1 MiB of memory)."""


def _combined_block_sizes(p: DeviceCapabilities, s: DeviceCapabilities) -> tuple[int, int, int]:
    pmin, smin = p.minimum_block_size, s.minimum_block_size
    if pmin % smin and smin % pmin:
        raise ValueError(f"block sizes {pmin} (primary) and {smin} (secondary): neither is a multiple of the other")
    minimum = max(pmin, smin)
    maximum = min(p.maximum_payload, s.maximum_payload) // minimum * minimum
    preferred = max(p.preferred_block_size, s.preferred_block_size, minimum)
    while preferred > maximum and preferred > minimum:
        preferred //= 2
    return minimum, preferred, max(maximum, preferred)


class MirrorDevice:
    """Serves ``primary`` while mirroring it to ``secondary``; see the module docstring.

    ``progress`` gets the percentage and "complete" (see ``Progress``). ``requests`` pieces are copied at once,
    each at most ``chunk_size`` bytes. ``secondary_is_zero`` says the secondary reads as zero everywhere (a new
    sparse file): the primary's holes are then skipped rather than zeroed. ``max_rate`` limits the copy to that
    many bytes of data per second (qemu's mirror "speed"), leaving the disks to the clients. The copy starts at
    once unless ``start=False`` (then call ``start()``). Raises ValueError when the two cannot be mirrored: sizes that
    differ, block sizes where neither is a multiple of the other, a read-only secondary.
    """

    def __init__(
        self,
        primary: BlockDevice,
        secondary: BlockDevice,
        progress: Progress | None = None,
        *,
        requests: int = 4,
        chunk_size: int = 1 << 20,
        secondary_is_zero: bool = False,
        max_rate: float | None = None,
        start: bool = True,
    ) -> None:
        if primary.size != secondary.size:
            raise ValueError(f"the primary holds {primary.size} bytes but the secondary {secondary.size}")
        p, s = primary.capabilities, secondary.capabilities
        if not s.can_write:
            raise ValueError("the secondary is read-only")
        if requests < 1:
            raise ValueError(f"requests {requests} must be at least 1")
        minimum, preferred, maximum = _combined_block_sizes(p, s)
        self.primary = primary
        self.secondary = secondary
        self._p, self._s = p, s
        self._size = primary.size
        self._progress = progress
        self._requests = requests
        self._chunk = max(minimum, min(chunk_size, maximum) // minimum * minimum)
        self._secondary_is_zero = secondary_is_zero
        if max_rate is not None and max_rate <= 0:
            raise ValueError(f"max_rate {max_rate} must be positive")
        self._max_rate = max_rate
        can_flush = p.can_flush or s.can_flush
        self._capabilities = DeviceCapabilities(
            can_write=p.can_write,
            can_flush=can_flush,
            can_fua=can_flush or p.can_fua or s.can_fua,
            can_trim=p.can_trim,
            can_zero=p.can_zero,
            can_fast_zero=p.can_fast_zero and s.can_zero and s.can_fast_zero,
            can_cache=p.can_cache,
            can_multi_conn=p.can_multi_conn and s.can_multi_conn,
            rotational=p.rotational,
            minimum_block_size=minimum,
            preferred_block_size=preferred,
            maximum_payload=maximum,
            meta_contexts=p.meta_contexts,
        )
        modes = (dispatch_of(primary), dispatch_of(secondary))
        remote = any(hasattr(side, "call_batch") for side in (primary, secondary))
        # Never "inline": a write may wait for the range the copy holds. A thread per request where a side waits
        # on a network (its batches would otherwise go one request at a time through this mirror).
        self.dispatch: Dispatch = "threads" if "threads" in modes or remote else "batch"
        self.regions = RegionLocks()
        self._mutex = threading.Lock()  # the state, the counts and the change map
        self._report_lock = threading.Lock()  # keeps reports in order
        self._state = MirrorState.COPYING
        self._failure: str | None = None  # why it failed, once it has
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._copied = self._data = 0
        self._reported = -1
        self._started_at = self._ended_at = 0.0
        self._workers: list[threading.Thread] = []
        self._running = 0
        # The copy's plan: where the next piece starts, and the primary's runs from there as last asked.
        self._plan_lock = threading.Lock()
        self._cursor = 0
        self._hint: list[tuple[int, int, bool]] = []  # (offset, length, is_zero), in order, from the cursor
        # What clients changed while the copy runs, one byte per block: where data was written, and where
        # something was zeroed or trimmed, since the primary was last asked about that block.
        self._mark_block = max(self._chunk, -(-self._size // _MARK_BLOCKS))
        self._written = bytearray(-(-self._size // self._mark_block))
        self._cleared = bytearray(len(self._written))
        self._tracking = True
        self._checkpoint: Callable[[str, int, int], None] | None = None
        """Test hook: called by the copy threads at "start", "lock" (before taking a range), "read" (holding it,
        before reading the primary), "write" (before writing the secondary), "zero" and "exit"."""
        if start:
            self.start()

    # --- What the device is -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities

    def status(self) -> MirrorStatus:
        """The state, bytes copied and rate (see MirrorStatus)."""
        with self._mutex:
            end = self._ended_at or time.monotonic()
            elapsed = end - self._started_at if self._started_at else 0.0
            rate = self._copied / elapsed if elapsed > 0 else 0.0
            return MirrorStatus(self._state, self._copied, self._data, self._size, elapsed, rate, self._failure)

    def wait(self, timeout: float | None = None) -> MirrorStatus:
        """Wait until the copy is complete or has failed (or ``timeout`` seconds), and say how it stands."""
        self._finished.wait(timeout)
        return self.status()

    # --- The client's requests ----------------------------------------------------------------------------

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.primary.pread_into(buffer, offset)

    def read_view(self, offset: int, length: int) -> memoryview | None:
        """The primary's zero-copy view, where it has them (nbdproto.ReadView)."""
        view = getattr(self.primary, "read_view", None)
        return view(offset, length) if view is not None else None

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        length = memoryview(data).nbytes
        token = self._acquire(offset, length)
        try:
            self.primary.pwrite(data, offset, fua)
            self._mark(self._written, offset, length)
            self._on_secondary(lambda: write_side(self.secondary, self._s, data, offset, fua))
        finally:
            self.regions.release(token)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        token = self._acquire(offset, length)
        try:
            self.primary.trim(offset, length, fua)
            self._mark(self._cleared, offset, length)
            self._on_secondary(lambda: trim_side(self.secondary, self._s, offset, length, fua))
        finally:
            self.regions.release(token)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        token = self._acquire(offset, length)
        try:
            self.primary.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
            self._mark(self._cleared, offset, length)
            self._on_secondary(lambda: zero_side(self.secondary, self._s, offset, length, may_trim, fast, fua))
        finally:
            self.regions.release(token)

    def flush(self) -> None:
        if self._p.can_flush:
            self.primary.flush()
        if self._s.can_flush and self._state is not MirrorState.FAILED:
            self._on_secondary(self.secondary.flush)

    def cache(self, offset: int, length: int) -> None:
        if self._p.can_cache:
            self.primary.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return self.primary.extents(context, offset, length)

    def close(self) -> None:
        """Stop the copy (the pieces in flight finish), flush both sides, and close them."""
        self._stop.set()
        for worker in self._workers:
            worker.join()
        try:
            self.flush()
        except OSError as exc:  # the mirror already failed, or a side did now: closing goes on
            log.warning("flushing the mirror on close failed: %s", exc)
        self.primary.close()
        self.secondary.close()

    def _acquire(self, offset: int, length: int) -> tuple[int, int, bool]:
        self._refuse_if_failed()
        token = self.regions.acquire(offset, offset + length)
        try:
            self._refuse_if_failed()  # it may have failed while this request waited
        except OSError:
            self.regions.release(token)
            raise
        return token

    def _refuse_if_failed(self) -> None:
        if self._state is MirrorState.FAILED:
            raise OSError(
                errno.EIO,
                f"the mirror failed: {self._failure}: writes are refused so that the two sides cannot diverge",
            )

    def _on_secondary(self, call: Callable[[], None]) -> None:
        """Carry a client's change out on the secondary; if it fails, the mirror has failed."""
        try:
            call()
        except Exception as exc:
            self._fail(f"the secondary failed: {_describe(exc)}")
            raise OSError(errno.EIO, f"the mirror's secondary failed: {_describe(exc)}") from exc

    def _mark(self, marks: bytearray, offset: int, length: int) -> None:
        if not self._tracking or length <= 0:
            return
        first, last = offset // self._mark_block, (offset + length - 1) // self._mark_block
        with self._mutex:
            marks[first : last + 1] = b"\x01" * (last + 1 - first)

    # --- The background copy ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background copy (once)."""
        if self._workers:
            return
        self._started_at = time.monotonic()
        self._report(0)
        self._running = self._requests
        self._workers = [
            threading.Thread(target=self._copy_worker, name=f"nbd-mirror-copy-{i}", daemon=True)
            for i in range(self._requests)
        ]
        for worker in self._workers:
            worker.start()

    def _point(self, name: str, offset: int = 0, length: int = 0) -> None:
        if self._checkpoint is not None:
            self._checkpoint(name, offset, length)

    def _copy_worker(self) -> None:
        self._point("start")
        buffer = memoryview(bytearray(self._chunk))
        try:
            while not self._stop.is_set():
                piece = self._next_piece()
                if piece is None:
                    break
                self._copy_piece(*piece, buffer)
        except _CopyFailed as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug or a device raising something unexpected: the copy cannot go on
            self._fail(f"the copy failed: {_describe(exc)}")
        finally:
            with self._mutex:
                self._running -= 1
                last = self._running == 0
            if last:
                self._finish()
            self._point("exit")

    def _next_piece(self) -> tuple[int, int, list[tuple[int, int, bool]]] | None:
        """The next range to copy and the primary's runs in it as last asked (None: the copy is done). Data
        pieces are at most a chunk long, holes up to ZERO_SPAN."""
        with self._plan_lock:
            if self._cursor >= self._size:
                return None
            if not self._hint:
                self._ask_ahead()
            offset, length, zero = self._hint[0]
            size = min(length, ZERO_SPAN if zero else self._chunk)
            if size == length:
                self._hint.pop(0)
            else:
                self._hint[0] = (offset + size, length - size, zero)
            self._cursor = offset + size
            return offset, size, [(offset, size, zero)]

    def _ask_ahead(self) -> None:
        """Ask the primary about the next window, having forgotten what clients changed there before."""
        start = self._cursor
        span = min(self._size - start, STATUS_SPAN)
        if BASE_ALLOCATION not in self._p.meta_contexts:
            self._hint = [(start, span, False)]
            return
        # A block the previous window shares (the window starts inside it) keeps its marks: a piece of that
        # window may not have been copied yet.
        first, last = -(-start // self._mark_block), (start + span - 1) // self._mark_block
        if first <= last:
            with self._mutex:
                self._written[first : last + 1] = self._cleared[first : last + 1] = bytes(last + 1 - first)
        try:
            self._hint = runs_of(self.primary, start, span, stop_short=True)
        except Exception as exc:
            raise _CopyFailed(f"block status of the primary at {start} failed: {_describe(exc)}") from exc

    def _copy_piece(self, offset: int, length: int, runs: list[tuple[int, int, bool]], buffer: memoryview) -> None:
        self._point("lock", offset, length)
        token = self.regions.acquire(offset, offset + length)
        try:
            first, last = offset // self._mark_block, (offset + length - 1) // self._mark_block
            with self._mutex:
                written = 1 in self._written[first : last + 1]
                cleared = 1 in self._cleared[first : last + 1]
            # Data written since the primary was asked leaves data as data; any other change is asked about
            # again, now that no client can change this range.
            if cleared or (written and any(zero for _, _, zero in runs)):
                try:
                    runs = runs_of(self.primary, offset, length, stop_short=False)
                except Exception as exc:
                    raise _CopyFailed(f"block status of the primary at {offset} failed: {_describe(exc)}") from exc
            data = 0
            for at, size, zero in runs:
                if zero:
                    self._point("zero", at, size)
                    self._zero_secondary(at, size)
                    continue
                for piece in range(at, at + size, self._chunk):
                    view = buffer[: min(self._chunk, at + size - piece)]
                    self._copy_data(view, piece)
                    data += len(view)
        finally:
            self.regions.release(token)
        self._copied_piece(length, data)

    def _copy_data(self, view: memoryview, offset: int) -> None:
        self._point("read", offset, len(view))
        try:
            self.primary.pread_into(view, offset)
        except Exception as exc:
            raise _CopyFailed(f"reading the primary at {offset} failed: {_describe(exc)}") from exc
        self._point("write", offset, len(view))
        self._stop_if_failed()
        try:
            self.secondary.pwrite(view, offset)
        except Exception as exc:
            raise _CopyFailed(f"the secondary failed at {offset}: {_describe(exc)}") from exc

    def _zero_secondary(self, offset: int, length: int) -> None:
        if self._secondary_is_zero:
            return
        self._stop_if_failed()
        try:
            zero_side(self.secondary, self._s, offset, length)
        except Exception as exc:
            raise _CopyFailed(f"the secondary failed at {offset}: {_describe(exc)}") from exc

    def _stop_if_failed(self) -> None:
        """A piece that was under way when the mirror failed asks nothing more of the secondary (which may be
        the stalled remote that failed it, and would hold this piece's range for another timeout)."""
        if self._state is MirrorState.FAILED:
            raise _CopyFailed(self._failure or "")

    def _copied_piece(self, length: int, data: int) -> None:
        with self._mutex:
            self._copied += length
            self._data += data
            percent = self._copied * 100 // self._size
            due = self._started_at + self._data / self._max_rate if self._max_rate else 0.0
        self._report(percent)
        if self._max_rate:
            self._stop.wait(max(0.0, due - time.monotonic()))  # close() ends the wait

    def _finish(self) -> None:
        """The last copy thread is done: if the whole primary was copied, make it durable and say so."""
        with self._mutex:
            complete = self._copied >= self._size and self._state is MirrorState.COPYING
        if not complete:
            self._ended_at = self._ended_at or time.monotonic()
            self._finished.set()
            return
        if self._s.can_flush:
            try:
                self.secondary.flush()
            except Exception as exc:
                self._fail(f"flushing the secondary failed: {_describe(exc)}")
                return
        with self._mutex:
            if self._state is not MirrorState.COPYING:
                return
            self._state = MirrorState.SYNCHRONISED
            self._tracking = False
            self._ended_at = time.monotonic()
        self._report(100)
        self._report("complete")
        self._finished.set()

    def _fail(self, reason: str) -> None:
        with self._mutex:
            if self._state is MirrorState.FAILED:
                return
            self._state, self._failure = MirrorState.FAILED, reason
            self._ended_at = self._ended_at or time.monotonic()
        self._stop.set()
        self._report(f"failed: {reason}")
        self._finished.set()

    def _report(self, value: int | str) -> None:
        if self._progress is None:
            return
        with self._report_lock:
            if isinstance(value, int):
                if value <= self._reported:
                    return
                self._reported = value
            self._progress(value)


class _CopyFailed(Exception):
    """The copy cannot go on; the message says why."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
