"""StatsFilter: count what clients ask of a device and how long the device takes.

Per command kind (read, write, zero, trim, flush, extents, cache): requests, bytes (of the requests that
succeeded: data read or written, or the length zeroed, trimmed, queried or cached), errors, and latency (the
time the inner device took) as percentiles. Latencies go into a histogram with eight buckets per doubling
(percentiles within about 6%), so the memory used stays the same however long the filter runs.

``snapshot()`` returns the figures as data; ``report()`` as a table, which ``nbdproto serve --filter stats``
prints at exit and on SIGUSR1. Reads answered from the inner device's read views are counted too (the filter
hands them out), so counting costs a plaintext read about a microsecond, not a copy. Thread-safe (one lock
around each update, a few hundred nanoseconds); capabilities, multi-conn safety and dispatch are the inner
device's.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from nbdproto.serving import BlockDevice, Buffer

from ._filter import FILTER_COMMANDS, Filter

__all__ = ["StatsFilter", "CommandStats", "STATS_COMMANDS"]

STATS_COMMANDS = tuple(FILTER_COMMANDS)

T = TypeVar("T")


@dataclass(frozen=True)
class CommandStats:
    """What one kind of command did through a StatsFilter. Latencies are in seconds (0 with no requests)."""

    count: int
    """Requests, failed ones included."""
    bytes: int
    """Bytes of the requests that succeeded."""
    errors: int
    """Requests that failed."""
    seconds: float
    """Time spent in the inner device, all requests together."""
    p50: float
    p90: float
    p99: float
    max: float


def _bucket(ns: int) -> int:
    # Four significant bits: eight buckets per doubling above 16 ns, exact below.
    if ns < 16:
        return max(ns, 0)
    shift = ns.bit_length() - 4
    return (shift << 4) | (ns >> shift)


def _bucket_middle(index: int) -> float:
    shift, mantissa = index >> 4, index & 15
    if not shift:
        return float(mantissa)
    return ((mantissa << shift) + ((mantissa + 1) << shift) - 1) / 2


class _Tally:
    __slots__ = ("count", "bytes", "errors", "nanoseconds", "max", "histogram")

    def __init__(self) -> None:
        self.count = self.bytes = self.errors = self.nanoseconds = self.max = 0
        self.histogram: dict[int, int] = {}

    def percentile(self, percent: float) -> float:
        if not self.count:
            return 0.0
        rank, seen = math.ceil(self.count * percent / 100), 0
        for index in sorted(self.histogram):
            seen += self.histogram[index]
            if seen >= rank:
                return min(_bucket_middle(index), self.max) / 1e9
        return self.max / 1e9


class StatsFilter(Filter):
    """``inner``, with every request counted and timed (see the module docstring)."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._tallies = {command: _Tally() for command in STATS_COMMANDS}
        self.started = time.monotonic()
        self._inner_view: Any = getattr(inner, "read_view", None)

    def _record(self, command: str, nbytes: int, elapsed: int, failed: bool) -> None:
        tally = self._tallies[command]
        with self._lock:
            tally.count += 1
            if failed:
                tally.errors += 1
            else:
                tally.bytes += nbytes
            tally.nanoseconds += elapsed
            if elapsed > tally.max:
                tally.max = elapsed
            index = _bucket(elapsed)
            tally.histogram[index] = tally.histogram.get(index, 0) + 1

    def _timed(self, command: str, nbytes: int, call: Callable[[], T]) -> T:
        start = time.perf_counter_ns()
        try:
            result = call()
        except BaseException:
            self._record(command, nbytes, time.perf_counter_ns() - start, True)
            raise
        self._record(command, nbytes, time.perf_counter_ns() - start, False)
        return result

    def read_view(self, offset: int, length: int) -> Any:
        """The inner device's view, counted as a read (its latency is the view's making: the copy is the
        kernel's, as the reply is sent); None, and nothing counted, where the inner device has no view and the
        server will call pread_into instead."""
        view_of = self._inner_view
        if view_of is None:
            return None
        start = time.perf_counter_ns()
        try:
            view = view_of(offset, length)
        except BaseException:
            self._record("read", length, time.perf_counter_ns() - start, True)
            raise
        if view is not None:
            self._record("read", length, time.perf_counter_ns() - start, False)
        return view

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._timed("read", len(buffer), lambda: self.inner.pread_into(buffer, offset))

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        self._timed("write", memoryview(data).nbytes, lambda: self.inner.pwrite(data, offset, fua))

    def flush(self) -> None:
        self._timed("flush", 0, self.inner.flush)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._timed("trim", length, lambda: self.inner.trim(offset, length, fua))

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        zero = self.inner.write_zeroes
        self._timed("zero", length, lambda: zero(offset, length, may_trim=may_trim, fast=fast, fua=fua))

    def cache(self, offset: int, length: int) -> None:
        self._timed("cache", length, lambda: self.inner.cache(offset, length))

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return self._timed("extents", length, lambda: self.inner.extents(context, offset, length))

    def snapshot(self) -> dict[str, CommandStats]:
        """The figures so far, per command kind (every kind, those never asked for with zeroes)."""
        with self._lock:
            return {
                command: CommandStats(
                    tally.count,
                    tally.bytes,
                    tally.errors,
                    tally.nanoseconds / 1e9,
                    tally.percentile(50),
                    tally.percentile(90),
                    tally.percentile(99),
                    tally.max / 1e9,
                )
                for command, tally in self._tallies.items()
            }

    def report(self, title: str = "") -> str:
        """The figures as a table, one line per command kind that was asked for."""
        elapsed = time.monotonic() - self.started
        lines = [f"{title + ': ' if title else ''}stats over {elapsed:.3f} s"]
        rows = [(command, s) for command, s in self.snapshot().items() if s.count]
        if not rows:
            lines.append("  no requests")
            return "\n".join(lines) + "\n"
        header = ("command", "count", "bytes", "errors", "p50", "p90", "p99", "max")
        table = [header] + [
            (command, str(s.count), _size(s.bytes), str(s.errors), *map(_duration, (s.p50, s.p90, s.p99, s.max)))
            for command, s in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells))
        return "\n".join(lines) + "\n"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"
