"""MirrorDevice: the race the region lock prevents, forced step by step; the copy's sparseness, progress, status,
failures and construction errors; trims, zeroes, FUA and flush reaching both sides.

The race tests run the mirror's copy threads one step at a time: the mirror's test hook parks each copy thread
at its checkpoints ("lock", "read", "write", "zero"), and the region lock's observer says which threads are
asleep waiting for a range. A ``Scheduler`` lets one parked copy thread go and waits, bounded, until every
thread is parked again, asleep on the lock, or done: no sleeps, and a deadlock fails the test instead of
hanging it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdproto import BASE_ALLOCATION, DeviceCapabilities
from nbdproto.devices import FileDevice, MemoryDevice, MirrorDevice, MirrorState
from nbdproto.devices._memory import PAGE_SIZE

SETTLE_TIMEOUT = 10.0


class Scheduler:
    """Parks the mirror's copy threads at their checkpoints and lets them go one at a time (see the module
    docstring). ``running`` counts the threads that are neither parked, asleep on the region lock, nor done."""

    def __init__(self, mirror: MirrorDevice, copy_threads: int) -> None:
        self.cond = threading.Condition()
        self.running = copy_threads  # the copy threads run from start() to their first checkpoint
        self.parked: dict[int, tuple[str, int, int]] = {}
        self.go: set[int] = set()
        self.asleep: set[int] = set()
        self.exited = 0
        self.clients: list[threading.Thread] = []
        self.failures: list[BaseException] = []
        mirror._checkpoint = self.checkpoint
        mirror.regions.observer = self

    # The mirror's copy threads call this at each checkpoint.
    def checkpoint(self, name: str, offset: int, length: int) -> None:
        me = threading.get_ident()
        with self.cond:
            self.running -= 1
            if name == "exit":
                self.exited += 1
                self.cond.notify_all()
                return
            self.parked[me] = (name, offset, length)
            self.cond.notify_all()
            self.cond.wait_for(lambda: me in self.go)
            self.go.discard(me)

    # The region lock's observer (called with the lock's mutex held).
    def waiting(self) -> None:
        with self.cond:
            self.asleep.add(threading.get_ident())
            self.running -= 1
            self.cond.notify_all()

    def released(self) -> None:
        with self.cond:
            self.running += len(self.asleep)  # every sleeper wakes to look again
            self.asleep.clear()

    def release(self, ident: int) -> None:
        with self.cond:
            del self.parked[ident]
            self.running += 1
            self.go.add(ident)
            self.cond.notify_all()

    def client(self, call: Callable[[], None]) -> threading.Thread:
        """Run a client request in a thread of its own."""

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # reported by finish()
                self.failures.append(exc)
            finally:
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()

        thread = threading.Thread(target=run, name="client")
        with self.cond:
            self.running += 1
        self.clients.append(thread)
        thread.start()
        return thread

    def settle(self) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.running == 0, SETTLE_TIMEOUT):
                raise AssertionError(f"threads still running after {SETTLE_TIMEOUT} s: {self.running}")

    def parked_at(self) -> list[tuple[int, tuple[str, int, int]]]:
        with self.cond:
            return sorted(self.parked.items())

    def finish(self, copy_threads: int) -> None:
        """Let every copy thread run to the end, then every client."""
        while True:
            self.settle()
            with self.cond:
                parked = list(self.parked)
                if not parked and self.exited == copy_threads:
                    break
                if not parked:
                    raise AssertionError("deadlock: nothing parked, yet copy threads have not finished")
            for ident in parked:
                self.release(ident)
        for thread in self.clients:
            thread.join(SETTLE_TIMEOUT)
            assert not thread.is_alive()
        if self.failures:
            raise self.failures[0]


class RecordingSecondary:
    """A MemoryDevice secondary that checks, at every data write of the copy, that the primary holds data
    there: a hole of the primary must never reach the secondary as data."""

    def __init__(self, primary: MemoryDevice, size: int) -> None:
        self.inner = MemoryDevice(size)
        self.primary = primary
        self.calls: list[tuple[str, str, int, int]] = []
        self.holes_written: list[tuple[int, int]] = []
        self.dispatch = "inline"

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self.inner.capabilities

    def _record(self, call: str, offset: int, length: int) -> None:
        self.calls.append((threading.current_thread().name, call, offset, length))

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        length = memoryview(data).nbytes
        self._record("pwrite", offset, length)
        if threading.current_thread().name.startswith("nbd-mirror-copy"):
            # The copy holds this range, so the primary cannot change under the check.
            for _, flags in self.primary.extents(BASE_ALLOCATION, offset, length):
                if flags:
                    self.holes_written.append((offset, length))
        self.inner.pwrite(data, offset, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._record("trim", offset, length)
        self.inner.trim(offset, length, fua)

    def write_zeroes(self, offset: int, length: int, **flags: Any) -> None:
        self._record("write_zeroes", offset, length)
        self.inner.write_zeroes(offset, length, **flags)

    def flush(self) -> None:
        self._record("flush", 0, 0)

    def cache(self, offset: int, length: int) -> None:
        pass

    def extents(self, context: str, offset: int, length: int) -> Any:
        return self.inner.extents(context, offset, length)

    def close(self) -> None:
        pass


def contents(device: Any) -> bytes:
    buffer = bytearray(device.size)
    device.pread_into(memoryview(buffer), 0)
    return bytes(buffer)


PAGES = 16
SIZE = PAGES * PAGE_SIZE
COPY_THREADS = 2


class MirrorRace(RuleBasedStateMachine):
    """Client writes, trims and zeroes from several threads against the copy's threads stepped one checkpoint
    at a time; at the end the secondary equals the primary and no hole of the primary was written as data."""

    @initialize(data_pages=st.sets(st.integers(0, PAGES - 1)), seed=st.integers(1, 255))
    def setup(self, data_pages: set[int], seed: int) -> None:
        self.primary = MemoryDevice(SIZE)
        for page in data_pages:
            self.primary.pwrite(bytes([seed ^ page]) * PAGE_SIZE, page * PAGE_SIZE)
        self.secondary = RecordingSecondary(self.primary, SIZE)
        self.secondary.inner.pwrite(b"\xee" * SIZE, 0)  # stale: every hole must be zeroed by the copy
        self.mirror = MirrorDevice(
            self.primary, self.secondary, requests=COPY_THREADS, chunk_size=2 * PAGE_SIZE, start=False
        )
        self.scheduler = Scheduler(self.mirror, COPY_THREADS)
        self.mirror.start()
        self.scheduler.settle()
        self.fill = 0

    @precondition(lambda self: bool(self.scheduler.parked_at()))
    @rule(pick=st.integers(0, COPY_THREADS - 1))
    def step_copy(self, pick: int) -> None:
        parked = self.scheduler.parked_at()
        ident, _ = parked[pick % len(parked)]
        self.scheduler.release(ident)
        self.scheduler.settle()

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        offset = data.draw(st.integers(0, SIZE - 1))
        length = data.draw(st.integers(1, min(3 * PAGE_SIZE, SIZE - offset)))
        return offset, length

    @rule(data=st.data())
    def client_write(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        self.fill = self.fill % 250 + 1
        payload = bytes([self.fill]) * length
        self._client(lambda: self.mirror.pwrite(payload, offset))

    @rule(data=st.data())
    def client_trim(self, data: st.DataObject) -> None:
        offset, length = self._range(data)
        self._client(lambda: self.mirror.trim(offset, length))

    @rule(data=st.data(), may_trim=st.booleans())
    def client_zero(self, data: st.DataObject, may_trim: bool) -> None:
        offset, length = self._range(data)
        self._client(lambda: self.mirror.write_zeroes(offset, length, may_trim=may_trim))

    def _client(self, call: Callable[[], None]) -> None:
        parked = {point for _, (point, _, _) in self.scheduler.parked_at()}
        self.scheduler.client(call)
        self.scheduler.settle()
        if self.scheduler.asleep:
            event(f"a client waits for the range of a copy parked at {sorted(parked)}")

    @invariant()
    def never_a_hole_as_data(self) -> None:
        if hasattr(self, "secondary"):
            assert not self.secondary.holes_written

    def teardown(self) -> None:
        if not hasattr(self, "mirror"):
            return
        self.scheduler.finish(COPY_THREADS)
        assert self.mirror.status().state is MirrorState.SYNCHRONISED
        assert contents(self.secondary.inner) == contents(self.primary)
        assert not self.secondary.holes_written


TestMirrorRace = MirrorRace.TestCase
TestMirrorRace.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class _NoLock:
    """A region lock that locks nothing: what the mirror would be without one."""

    observer = None

    def acquire(self, start: int, end: int, *, exclusive: bool = True) -> tuple[int, int, bool]:
        return (start, end, exclusive)

    def release(self, token: tuple[int, int, bool]) -> None:
        pass


@pytest.mark.parametrize("locked", [True, False], ids=["region-lock", "no-lock"])
def test_copy_reads_n_client_writes_n_copy_writes_old_n(locked: bool) -> None:
    """The exact interleaving: the copy reads block N, a client writes block N, the copy writes the old N.
    With the region lock the client's write waits and lands last; without it the secondary keeps the old
    block (which shows that this test can see the race)."""
    primary = MemoryDevice(SIZE)
    primary.pwrite(b"old!" * (PAGE_SIZE // 4), 0)
    secondary = MemoryDevice(SIZE)
    mirror = MirrorDevice(primary, secondary, requests=1, chunk_size=PAGE_SIZE, start=False)
    if not locked:
        mirror.regions = _NoLock()  # type: ignore[assignment]
    scheduler = Scheduler(mirror, 1)
    mirror.start()
    scheduler.settle()
    while scheduler.parked_at()[0][1][:2] != ("write", 0):  # start, lock 0, read 0, write 0
        scheduler.release(scheduler.parked_at()[0][0])
        scheduler.settle()
    # The copy has read the old block 0 and not yet written it. A client writes block 0:
    writer = scheduler.client(lambda: mirror.pwrite(b"new!" * (PAGE_SIZE // 4), 0))
    scheduler.settle()
    if locked:
        assert writer.is_alive() and scheduler.asleep, "the client's write must wait for the copy's range"
    else:
        writer.join(SETTLE_TIMEOUT)
        assert not writer.is_alive()
    scheduler.finish(1)
    assert contents(primary)[:4] == b"new!"
    if locked:
        assert contents(secondary) == contents(primary)
    else:
        assert contents(secondary)[:4] == b"old!", "without the lock the copy overwrites the newer block"


def test_client_write_before_the_copy_takes_its_range_is_copied_again() -> None:
    primary = MemoryDevice(SIZE)
    secondary = MemoryDevice(SIZE)
    mirror = MirrorDevice(primary, secondary, requests=1, chunk_size=PAGE_SIZE, start=False)
    scheduler = Scheduler(mirror, 1)
    mirror.start()
    scheduler.settle()
    scheduler.release(scheduler.parked_at()[0][0])  # start -> lock, with the whole disk planned as a hole
    scheduler.settle()
    assert scheduler.parked_at()[0][1][0] == "lock"
    scheduler.client(lambda: mirror.pwrite(b"x" * 100, 5 * PAGE_SIZE + 7))
    scheduler.settle()
    scheduler.finish(1)
    # The hole the copy planned was asked about again under the lock: the write is data now, and stays.
    assert contents(secondary) == contents(primary)
    assert contents(secondary)[5 * PAGE_SIZE + 7 : 5 * PAGE_SIZE + 107] == b"x" * 100


# --- The copy on its own -------------------------------------------------------------------------------------


def test_sparse_copy_zeroes_holes_and_reports_each_percent_then_complete() -> None:
    primary = MemoryDevice(64 * PAGE_SIZE)
    for page in (0, 1, 17, 40, 63):
        primary.pwrite(os.urandom(PAGE_SIZE), page * PAGE_SIZE)
    secondary = RecordingSecondary(primary, primary.size)
    secondary.inner.pwrite(b"\xee" * primary.size, 0)
    reports: list[int | str] = []
    mirror = MirrorDevice(primary, secondary, reports.append, chunk_size=PAGE_SIZE)
    status = mirror.wait(10)
    assert status.state is MirrorState.SYNCHRONISED
    assert (status.copied, status.data, status.total) == (primary.size, 5 * PAGE_SIZE, primary.size)
    assert status.rate > 0 and status.percent == 100
    assert contents(secondary.inner) == contents(primary)
    assert not secondary.holes_written
    copy_calls = [(call, length) for who, call, _, length in secondary.calls if who.startswith("nbd-mirror")]
    assert sum(length for call, length in copy_calls if call == "pwrite") == 5 * PAGE_SIZE
    assert {call for call, _ in copy_calls} == {"pwrite", "write_zeroes", "flush"}
    percents = reports[:-1]
    assert reports[-1] == "complete" and percents[0] == 0 and percents[-1] == 100
    assert percents == sorted(set(percents)), "each percent once, in order"
    mirror.close()


def test_secondary_known_zero_skips_holes(tmp_path: Any) -> None:
    primary = MemoryDevice(32 * PAGE_SIZE)
    primary.pwrite(b"d" * PAGE_SIZE, 3 * PAGE_SIZE)
    secondary = RecordingSecondary(primary, primary.size)
    mirror = MirrorDevice(primary, secondary, secondary_is_zero=True)
    assert mirror.wait(10).state is MirrorState.SYNCHRONISED
    assert {call for who, call, _, _ in secondary.calls if who.startswith("nbd-mirror")} == {"pwrite", "flush"}
    assert contents(secondary.inner) == contents(primary)


def test_file_to_file_keeps_holes(tmp_path: Any) -> None:
    src, dst = tmp_path / "p.img", tmp_path / "s.img"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
        f.seek(4 << 20)
        f.write(os.urandom(3 << 20))
    with open(dst, "wb") as f:
        f.write(b"\xff" * (32 << 20))
    mirror = MirrorDevice(FileDevice(src), FileDevice(dst), requests=3)
    assert mirror.wait(20).state is MirrorState.SYNCHRONISED
    mirror.close()
    assert src.read_bytes() == dst.read_bytes()
    assert os.stat(dst).st_blocks * 512 <= 4 << 20, "the primary's holes became holes"


def test_rate_limit_slows_the_copy() -> None:
    primary = MemoryDevice(64 * PAGE_SIZE)
    primary.pwrite(b"r" * primary.size, 0)
    mirror = MirrorDevice(primary, MemoryDevice(primary.size), max_rate=8 << 20, chunk_size=PAGE_SIZE)
    status = mirror.wait(10)
    assert status.state is MirrorState.SYNCHRONISED and status.elapsed >= 0.4  # 4 MiB at 8 MiB/s
    mirror.close()


def test_writes_during_and_after_the_copy_reach_both_sides() -> None:
    primary = MemoryDevice(256 * PAGE_SIZE)
    primary.pwrite(os.urandom(primary.size), 0)
    secondary = MemoryDevice(primary.size)
    mirror = MirrorDevice(primary, secondary, chunk_size=PAGE_SIZE, max_rate=32 << 20)
    stop = threading.Event()

    def hammer(seed: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            offset = (seed * 7919 + n * 104729) % (primary.size - 5000)
            mirror.pwrite(bytes([n % 256]) * 5000, offset)
            if n % 5 == 0:
                mirror.write_zeroes(offset, 3000, may_trim=n % 2 == 0)
            if n % 7 == 0:
                mirror.trim(offset // PAGE_SIZE * PAGE_SIZE, PAGE_SIZE)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    status = mirror.wait(30)
    stop.set()
    for thread in threads:
        thread.join()
    assert status.state is MirrorState.SYNCHRONISED
    mirror.pwrite(b"after", 12345, fua=True)
    assert contents(secondary) == contents(primary)
    mirror.close()


# --- Failures and construction errors ------------------------------------------------------------------------


class FailingSecondary(MemoryDevice):
    """Writes fail with EIO once ``fail_after`` of them succeeded."""

    def __init__(self, size: int, fail_after: int) -> None:
        super().__init__(size)
        self.writes = 0
        self.fail_after = fail_after

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.writes += 1
        if self.writes > self.fail_after:
            raise OSError(errno.EIO, "the disk is on fire")
        super().pwrite(data, offset, fua)


def test_secondary_failing_during_the_copy_stops_it_and_refuses_writes() -> None:
    primary = MemoryDevice(64 * PAGE_SIZE)
    primary.pwrite(b"p" * primary.size, 0)
    reports: list[int | str] = []
    mirror = MirrorDevice(primary, FailingSecondary(primary.size, 3), reports.append, chunk_size=PAGE_SIZE)
    status = mirror.wait(10)
    assert status.state is MirrorState.FAILED and status.reason is not None
    assert status.reason.startswith("the secondary failed at ") and "the disk is on fire" in status.reason
    assert reports[-1] == f"failed: {status.reason}" and "complete" not in reports
    assert status.copied < primary.size
    with pytest.raises(OSError) as refused:
        mirror.pwrite(b"x", 0)
    assert refused.value.errno == errno.EIO
    for call in (lambda: mirror.trim(0, 10), lambda: mirror.write_zeroes(0, 10)):
        with pytest.raises(OSError, match="failed"):
            call()
    assert contents(primary)[:1] == b"p", "a refused write does not touch the primary"
    buffer = bytearray(4)
    mirror.pread_into(memoryview(buffer), 0)  # reads go on
    assert buffer == b"pppp"
    mirror.flush()
    mirror.close()


def test_secondary_failing_after_synchronising_fails_the_write_with_eio() -> None:
    primary = MemoryDevice(4 * PAGE_SIZE)
    secondary = FailingSecondary(primary.size, 10**9)
    reports: list[int | str] = []
    mirror = MirrorDevice(primary, secondary, reports.append)
    assert mirror.wait(10).state is MirrorState.SYNCHRONISED
    secondary.fail_after = 0
    with pytest.raises(OSError) as failed:
        mirror.pwrite(b"x", 0)
    assert failed.value.errno == errno.EIO
    failed_status = mirror.status()
    assert failed_status.state is MirrorState.FAILED and str(failed_status.reason).startswith("the secondary failed")
    assert reports[-1] == f"failed: {failed_status.reason}"
    with pytest.raises(OSError):
        mirror.pwrite(b"y", 0)
    mirror.close()


def _with_caps(device: Any, **caps: Any) -> Any:
    """``device`` with some of its capabilities replaced (a duck-typed device)."""
    fields = {name: getattr(device.capabilities, name) for name in DeviceCapabilities.__dataclass_fields__}
    fields.update(caps)
    wrapper = types.SimpleNamespace(
        size=device.size,
        capabilities=types.SimpleNamespace(**fields),
        **{m: getattr(device, m) for m in ("pread_into", "pwrite", "flush", "trim", "write_zeroes", "cache")},
        extents=device.extents,
        close=device.close,
    )
    return wrapper


@pytest.mark.parametrize(
    ("secondary", "message"),
    [
        (lambda: MemoryDevice(2 * PAGE_SIZE), "the primary holds 65536 bytes but the secondary 131072"),
        (lambda: MemoryDevice(PAGE_SIZE, read_only=True), "the secondary is read-only"),
        (
            lambda: _with_caps(MemoryDevice(PAGE_SIZE), minimum_block_size=6),
            "block sizes 4 (primary) and 6 (secondary): neither",
        ),
    ],
    ids=["sizes", "read-only", "block-sizes"],
)
def test_construction_errors(secondary: Callable[[], Any], message: str) -> None:
    primary = MemoryDevice(PAGE_SIZE)
    if "neither" in message:
        primary = _with_caps(primary, minimum_block_size=4)
    with pytest.raises(ValueError, match=re.escape(message)):
        MirrorDevice(primary, secondary())


def test_block_sizes_combine_and_capabilities_are_what_both_can_do() -> None:
    primary = _with_caps(MemoryDevice(PAGE_SIZE), minimum_block_size=512, preferred_block_size=4096)
    secondary = _with_caps(MemoryDevice(PAGE_SIZE), minimum_block_size=4096, can_fast_zero=False, can_fua=False)
    mirror = MirrorDevice(primary, secondary, start=False)
    caps = mirror.capabilities
    assert caps.minimum_block_size == 4096
    assert caps.can_fua and not caps.can_fast_zero and caps.can_trim and caps.can_zero
    assert mirror.dispatch == "threads"  # duck devices without a dispatch hint
    mirror.close()


class LoggingDevice(MemoryDevice):
    """Records the calls that reach it and their durability flags."""

    def __init__(self, size: int, **caps: Any) -> None:
        super().__init__(size)
        self.log: list[tuple[str, Any]] = []
        self._logged_caps = dataclasses.replace(super().capabilities, **caps)

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._logged_caps

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        if not threading.current_thread().name.startswith("nbd-mirror"):
            self.log.append(("pwrite", fua))
        super().pwrite(data, offset, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.log.append(("trim", fua))
        MemoryDevice.write_zeroes(self, offset, length)  # not through the logged write_zeroes

    def write_zeroes(self, offset: int, length: int, **flags: Any) -> None:
        if not threading.current_thread().name.startswith("nbd-mirror"):
            self.log.append(("write_zeroes", flags))
        super().write_zeroes(offset, length, **flags)

    def flush(self) -> None:
        if not threading.current_thread().name.startswith("nbd-mirror"):
            self.log.append(("flush", None))


def test_trims_zeroes_fua_and_flush_reach_both_sides() -> None:
    primary = LoggingDevice(4 * PAGE_SIZE)
    secondary = LoggingDevice(4 * PAGE_SIZE, can_fua=False)  # FUA there: a write, then a flush
    mirror = MirrorDevice(primary, secondary)
    assert mirror.wait(10).state is MirrorState.SYNCHRONISED
    mirror.pwrite(b"a", 0, fua=True)
    mirror.trim(0, PAGE_SIZE, fua=True)
    mirror.write_zeroes(PAGE_SIZE, PAGE_SIZE, may_trim=False, fast=True)
    mirror.flush()
    assert primary.log == [
        ("pwrite", True),
        ("trim", True),
        ("write_zeroes", {"may_trim": False, "fast": True, "fua": False}),
        ("flush", None),
    ]
    assert secondary.log == [
        ("pwrite", False),
        ("flush", None),
        ("trim", False),
        ("flush", None),
        ("write_zeroes", {"may_trim": False, "fast": True, "fua": False}),
        ("flush", None),
    ]
    mirror.close()
