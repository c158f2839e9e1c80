"""The filters of nbdproto.devices as devices: the pass-through base, readonly, delay, error, log and stats, each
against a bytearray model, their capabilities over different inner devices, and stacks of them."""

from __future__ import annotations

import errno
import io
import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import nbdproto as n
import nbdproto.serving
from nbdproto.devices import (
    BlockSizeFilter,
    CowFilter,
    DelayFilter,
    ErrorFilter,
    FileDevice,
    Filter,
    LogFilter,
    MemoryDevice,
    ReadOnlyFilter,
    StatsFilter,
)
from nbdproto.devices._stats import _bucket, _bucket_middle
from nbdproto.serving import enter_connection
from tests.filtertools import NoWrites, operations, run_against_model
from tests.threaded import run_threads

SIZE = 1 << 20
TF = n.TransmissionFlags

# Filters that must not change what a device holds: each, over a MemoryDevice, behaves exactly like one.
TRANSPARENT: dict[str, Callable[[Any], Any]] = {
    "filter": Filter,
    "delay-zero": DelayFilter,
    "delay": lambda inner: DelayFilter(inner, read=1e-6, write=1e-6, zero=1e-6, trim=1e-6, flush=1e-6, extents=1e-6),
    "error-rate-0": lambda inner: ErrorFilter(inner, rate=0),
    "error-trigger-absent": lambda inner: ErrorFilter(inner, trigger="/nonexistent/trigger"),
    "log": lambda inner: LogFilter(inner, io.StringIO()),
    "stats": StatsFilter,
    "blocksize-split": lambda inner: BlockSizeFilter(inner, maximum=4096),
    "stack": lambda inner: LogFilter(StatsFilter(DelayFilter(ErrorFilter(Filter(inner), rate=0))), io.StringIO()),
}


@pytest.mark.parametrize("make", TRANSPARENT.values(), ids=list(TRANSPARENT))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations(SIZE))
def test_a_transparent_filter_behaves_like_its_device(make: Callable[[Any], Any], ops: list[Any]) -> None:
    inner = MemoryDevice(SIZE)
    device = make(inner)
    model = bytearray(SIZE)
    run_against_model(device, model, ops)
    whole = memoryview(bytearray(SIZE))
    inner.pread_into(whole, 0)
    assert bytes(whole) == model  # the writes really reached the inner device
    device.close()


def test_calls_a_filter_does_not_change_are_the_inner_devices_own(tmp_path: Any) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(SIZE))
    inner = FileDevice(path)
    plain = Filter(inner)
    for name in ("pread_into", "pwrite", "flush", "trim", "write_zeroes", "cache", "extents"):
        assert getattr(plain, name) == getattr(inner, name), name  # the bound method itself: no frame of ours
        assert plain.passes_through(name)
    assert plain.read_view == inner.read_view and plain.fileno == inner.fileno  # type: ignore[attr-defined]
    assert plain.dispatch == inner.dispatch and plain.size == SIZE and plain.capabilities == inner.capabilities
    # A filter that changes reads must not offer the inner device's views or sendfile, which would skip it.
    log = LogFilter(inner, io.StringIO())
    for changes_reads in (log, DelayFilter(inner, read=1)):
        assert getattr(changes_reads, "read_view", None) is None, changes_reads
        assert getattr(changes_reads, "fileno", None) is None, changes_reads
    # The error and stats filters hand out the inner device's views themselves, failing or counting first.
    for own in (ErrorFilter(inner), StatsFilter(inner)):
        assert own.read_view != inner.read_view and getattr(own, "fileno", None) is None
    # One that leaves reads alone offers them.
    for leaves_reads in (ErrorFilter(inner, commands=["write"]), DelayFilter(inner, write=1), ReadOnlyFilter(inner)):
        assert getattr(leaves_reads, "read_view", None) == inner.read_view, leaves_reads
    inner.close()


def test_a_resize_goes_through_or_is_refused_with_enotsup() -> None:
    with pytest.raises(OSError) as info:
        Filter(MemoryDevice(4096)).resize(8192)
    assert info.value.errno == errno.ENOTSUP

    class Resizable(MemoryDevice):
        def resize(self, size: int) -> None:
            self._size = size

    device = Resizable(4096)
    Filter(device).resize(8192)
    assert device.size == 8192


def test_capabilities_combine_the_filter_with_its_inner_device() -> None:
    read_only = MemoryDevice(SIZE, read_only=True)
    writable = MemoryDevice(SIZE)
    cannot_write = NoWrites(MemoryDevice(SIZE))

    def flags(device: Any) -> TF:
        return n.ExportSpec(device, read_only=False).export("d").flags

    # A delay filter over a read-only device stays read-only; over a writable one it stays writable.
    assert flags(DelayFilter(read_only, write=0.001)) & TF.READ_ONLY
    assert not flags(DelayFilter(writable, write=0.001)) & TF.READ_ONLY
    # The readonly filter makes any device read-only, with no write-side feature advertised.
    ro = flags(ReadOnlyFilter(writable))
    assert ro & TF.READ_ONLY and not ro & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FUA)
    # A cow overlay writes, trims and zeroes over a device that can do none of it.
    assert not cannot_write.capabilities.can_trim
    cow = CowFilter(cannot_write)
    assert cow.capabilities.can_write and cow.capabilities.can_trim and cow.capabilities.can_zero
    cow_flags = flags(cow)
    assert not cow_flags & TF.READ_ONLY and cow_flags & TF.SEND_TRIM and cow_flags & TF.SEND_FAST_ZERO
    assert cow_flags & TF.CAN_MULTI_CONN
    # Multi-conn is the inner device's for the filters that keep no state of their own.
    not_multi = FilterWith(writable, can_multi_conn=False)
    for make in (Filter, DelayFilter, ErrorFilter, StatsFilter, ReadOnlyFilter, BlockSizeFilter):
        assert not make(not_multi).capabilities.can_multi_conn
        assert make(writable).capabilities.can_multi_conn


class FilterWith(Filter):
    """A filter that changes nothing but the capabilities it is given."""

    def __init__(self, inner: Any, **changes: Any) -> None:
        super().__init__(inner)
        self.changes = changes

    def _capabilities_over(self, inner: n.DeviceCapabilities) -> n.DeviceCapabilities:
        from dataclasses import replace

        return replace(inner, **self.changes)


def test_the_readonly_filter_refuses_every_write_and_changes_nothing() -> None:
    inner = MemoryDevice(SIZE)
    inner.pwrite(b"keep", 0)
    device = ReadOnlyFilter(inner)
    calls = [
        lambda: device.pwrite(b"x", 0),
        lambda: device.trim(0, 4096),
        lambda: device.write_zeroes(0, 4096),
        lambda: device.resize(2 * SIZE),
    ]
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EROFS and n.serving.nbd_errno(info.value) == n.Errno.EPERM
    buffer = memoryview(bytearray(4))
    device.pread_into(buffer, 0)
    assert bytes(buffer) == b"keep"
    device.flush()


def test_delays_apply_to_their_own_commands_only() -> None:
    inner = MemoryDevice(SIZE)
    device = DelayFilter(inner, write=0.05, extents=0.05)
    assert device.dispatch == "threads"  # a sleeping device must not be called on an event loop
    assert device.passes_through("pread_into") and not device.passes_through("pwrite")
    start = time.monotonic()
    device.pwrite(b"x", 0)
    assert time.monotonic() - start >= 0.05
    start = time.monotonic()
    device.extents(n.BASE_ALLOCATION, 0, SIZE)
    assert time.monotonic() - start >= 0.05
    start = time.monotonic()
    for _ in range(20):  # either delayed, these would take 1 s at least; undelayed, far less even on a busy machine
        device.pread_into(memoryview(bytearray(10)), 0)
        device.flush()
    assert time.monotonic() - start < 0.5
    assert DelayFilter(inner).dispatch == "inline"  # no delay: the inner device's own hint
    with pytest.raises(ValueError, match="finite"):
        DelayFilter(inner, read=-1)


def test_errors_hit_the_chosen_commands_and_change_nothing() -> None:
    inner = MemoryDevice(SIZE)
    device = ErrorFilter(inner, error=errno.ENOSPC, commands=["write", "zero"])
    with pytest.raises(OSError) as info:
        device.pwrite(b"x" * 10, 0)
    assert info.value.errno == errno.ENOSPC and "ENOSPC injected into write" in str(info.value)
    with pytest.raises(OSError):
        device.write_zeroes(0, 10)
    assert inner.allocated == 0  # the failed write never reached the device
    device.trim(0, 4096)
    device.pread_into(memoryview(bytearray(10)), 0)
    assert device.extents(n.BASE_ALLOCATION, 0, 10)
    with pytest.raises(ValueError, match="not one of the NBD errors"):
        ErrorFilter(inner, error=errno.EBADF)
    with pytest.raises(ValueError, match="no such command"):
        ErrorFilter(inner, commands=["frobnicate"])


def test_reads_from_views_fail_and_count_like_any_other(tmp_path: Any) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(b"v" * SIZE)
    inner = FileDevice(path)
    trigger = tmp_path / "fail"
    stats = StatsFilter(ErrorFilter(inner, error=errno.EIO, trigger=trigger))
    read = n.ReadRequest(1, 4096, 512)
    reply = n.serving.carry_out(
        stats, read, {}, None, n.serving.read_view_of(stats)
    )  # as a server answers on plaintext
    assert isinstance(reply, n.ReadData) and bytes(reply.data) == b"v" * 512
    assert isinstance(reply.data, memoryview) and reply.data.obj is not None  # a view, not a copy
    trigger.touch()
    failed = n.serving.carry_out(stats, read, {}, None, n.serving.read_view_of(stats))
    assert isinstance(failed, n.ErrorReply) and failed.error == n.Errno.EIO
    assert (stats.snapshot()["read"].count, stats.snapshot()["read"].errors) == (2, 1)
    # A device without views: nothing is counted by the view, and pread_into counts the read once.
    plain = StatsFilter(ErrorFilter(MemoryDevice(SIZE), rate=0))
    assert n.serving.read_view_of(plain) is not None and plain.read_view(0, 10) is None
    reply = n.serving.carry_out(plain, read, {}, None, n.serving.read_view_of(plain))
    assert isinstance(reply, n.ReadData) and plain.snapshot()["read"].count == 1
    inner.close()


def test_an_error_rate_is_a_probability() -> None:
    device = ErrorFilter(MemoryDevice(SIZE), rate=0.25, chance=random.Random(7))
    failures = 0
    for _ in range(4000):
        try:
            device.pread_into(memoryview(bytearray(1)), 0)
        except OSError as exc:
            assert exc.errno == errno.EIO
            failures += 1
    assert 800 < failures < 1200  # 1000 expected; this seed gives a fixed count well inside


def test_a_trigger_file_switches_errors_on_and_off(tmp_path: Any) -> None:
    trigger = tmp_path / "inject"
    device = ErrorFilter(MemoryDevice(SIZE), trigger=trigger, commands=["read"])
    buffer = memoryview(bytearray(10))
    device.pread_into(buffer, 0)
    trigger.touch()
    with pytest.raises(OSError):
        device.pread_into(buffer, 0)
    trigger.unlink()
    device.pread_into(buffer, 0)


LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} connection=(\d+) (\.\.\.)?(\w+) id=(\d+)(.*)$",
)


def test_the_log_has_a_line_per_request_and_per_reply() -> None:
    out = io.StringIO()
    device = LogFilter(ErrorFilter(MemoryDevice(SIZE), error=errno.ENOSPC, commands=["trim"]), out)
    device.pwrite(b"x" * 512, 4096, fua=True)
    device.pread_into(memoryview(bytearray(512)), 4096)
    device.write_zeroes(0, 4096, may_trim=False, fast=True)
    with pytest.raises(OSError):
        device.trim(0, 4096)
    device.extents(n.BASE_ALLOCATION, 0, SIZE)
    device.flush()
    device.cache(0, 100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 14
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    requests = [(m[3], m[4], m[5]) for m in parsed if m and not m[2]]
    replies = {m[4]: (m[3], m[5]) for m in parsed if m and m[2]}
    assert [command for command, _, _ in requests] == ["Write", "Read", "Zero", "Trim", "Extents", "Flush", "Cache"]
    assert requests[0][2] == " offset=0x1000 length=0x200 flags=fua"
    assert requests[2][2] == " offset=0x0 length=0x1000 flags=no_hole|fast_zero"
    assert "context=base:allocation" in requests[4][2]
    for command, request_id, _ in requests:
        reply_command, details = replies[request_id]
        assert reply_command == command and re.search(r"latency=\d+\.\d{6}", details)
    assert "result=ENOSPC" in replies[requests[3][1]][1]
    assert "result=ok" in replies[requests[0][1]][1] and "extents=" in replies[requests[4][1]][1]


def test_the_log_numbers_connections_by_the_context_that_serves_them() -> None:
    out = io.StringIO()
    device = LogFilter(MemoryDevice(SIZE), out)

    def connection(numbered: bool) -> None:  # a thread per connection, as the threads server runs them
        if numbered:
            enter_connection()
        for _ in range(3):
            device.pread_into(memoryview(bytearray(1)), 0)

    threads = [threading.Thread(target=connection, args=(i % 2 == 0,)) for i in range(4)]
    for thread in threads:
        thread.start()
        thread.join()
    numbers = [int(m[1]) for m in map(LINE.match, out.getvalue().splitlines()) if m]
    assert len(numbers) == 24
    runs = [numbers[i * 6 : i * 6 + 6] for i in range(4)]
    assert all(len(set(run)) == 1 for run in runs)  # one number per connection
    assert len({run[0] for run in runs}) == 4  # and a different one for each


def test_the_log_writes_to_a_file_it_owns(tmp_path: Any) -> None:
    path = tmp_path / "log"
    device = LogFilter(MemoryDevice(SIZE), path)
    device.flush()
    assert "Flush" in path.read_text()  # line-buffered: there at once
    device.close()
    LogFilter(MemoryDevice(SIZE), path, append=True).flush()
    assert path.read_text().count("...Flush") == 2


def test_stats_count_requests_bytes_errors_and_latencies() -> None:
    device = StatsFilter(ErrorFilter(MemoryDevice(SIZE), commands=["trim"]))
    for i in range(10):
        device.pwrite(b"x" * 1000, i * 1000)
    for _ in range(5):
        device.pread_into(memoryview(bytearray(4096)), 0)
    device.write_zeroes(0, 65536)
    for _ in range(3):
        with pytest.raises(OSError):
            device.trim(0, 4096)
    device.extents(n.BASE_ALLOCATION, 0, SIZE)
    device.flush()
    stats = device.snapshot()
    assert (stats["write"].count, stats["write"].bytes, stats["write"].errors) == (10, 10_000, 0)
    assert (stats["read"].count, stats["read"].bytes) == (5, 20480)
    assert (stats["zero"].count, stats["zero"].bytes) == (1, 65536)
    assert (stats["trim"].count, stats["trim"].bytes, stats["trim"].errors) == (3, 0, 3)
    assert (stats["extents"].count, stats["flush"].count, stats["cache"].count) == (1, 1, 0)
    for s in stats.values():
        assert 0 <= s.p50 <= s.p90 <= s.p99 <= s.max
    report = device.report("disk")
    assert report.startswith("disk: stats over")
    assert re.search(r"write\s+10\s+9\.8 KiB\s+0", report) and re.search(r"trim\s+3\s+0 B\s+3", report)
    assert "cache" not in report


def test_latency_percentiles_are_within_a_few_percent() -> None:
    for ns in [0, 1, 15, 16, 17, 100, 999, 12_345, 1_000_000, 123_456_789, 10**12]:
        middle = _bucket_middle(_bucket(ns))
        assert abs(middle - ns) <= max(1, ns) * 0.0625, (ns, middle)
    stats = StatsFilter(MemoryDevice(SIZE))
    tally = stats._tallies["read"]
    for i in range(1, 1001):  # latencies of 1..1000 us
        ns = i * 1000
        tally.count += 1
        tally.max = max(tally.max, ns)
        tally.histogram[_bucket(ns)] = tally.histogram.get(_bucket(ns), 0) + 1
    for percent, expected in ((50, 500e-6), (90, 900e-6), (99, 990e-6)):
        assert abs(tally.percentile(percent) - expected) <= expected * 0.07


def test_filters_are_thread_safe_bookkeepers() -> None:
    out = io.StringIO()
    stats = StatsFilter(MemoryDevice(SIZE))
    device = LogFilter(stats, out)

    def work(i: int) -> None:
        for j in range(200):
            device.pwrite(bytes([i]) * 100, (i * 200 + j) * 100 % (SIZE - 100))

    run_threads(work, 8)
    assert stats.snapshot()["write"].count == 1600
    lines = out.getvalue().splitlines()
    assert len(lines) == 3200 and all(LINE.match(line) for line in lines)
    assert len({LINE.match(line)[4] for line in lines}) == 1600  # type: ignore[index]
