"""Dirty bitmaps (nbdproto.devices.bitmaps): the bit array and the filter against simple models, the instant
between two requests (quiesced), group commit, failures of the store, growth, and the contexts a server offers.

The stores on disk and on S3 are in test_bitmap_stores.py; qemu side by side in test_bitmaps_interop.py; SIGKILL
in test_bitmaps_crash.py.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import nbdproto_threads as nt
from nbdproto import Buffer, DeviceCall
from nbdproto.devices import Filter, MemoryDevice, NbdDevice
from nbdproto.devices.bitmaps import (
    BitmapError,
    DirtyBitmap,
    DirtyBitmapFilter,
    MemoryBitmapStore,
    SidecarBitmapStore,
    StoredBitmap,
)
from nbdproto.devices.bitmaps import _bits as bits_module
from tests.serving import Export, serve_exports
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20
CONTEXT = "qemu:dirty-bitmap:"


# --- The bit array against a list of booleans --------------------------------------------------------------------


def model_extents(model: list[bool], shift: int, size: int, offset: int, length: int) -> list[tuple[int, int]]:
    """qemu's answer, byte by byte: runs of one state, each cut at the range's ends."""
    out: list[tuple[int, int]] = []
    for position in range(offset, min(offset + length, size)):
        flag = int(model[position >> shift])
        if out and out[-1][1] == flag:
            out[-1] = (out[-1][0] + 1, flag)
        else:
            out.append((1, flag))
    return out


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 200),
    ranges=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 199)), max_size=8),
    data=st.data(),
)
def test_bit_array_matches_a_list_of_booleans(count: int, ranges: list[tuple[int, int]], data: Any) -> None:
    bits = bytearray(bits_module.byte_count(count))
    model = [False] * count
    for a, b in ranges:
        start, end = sorted((a % count, b % count + 1))
        bits_module.set_range(bits, start, end)
        model[start:end] = [True] * (end - start)
    assert [bits_module.is_set(bits, i) for i in range(count)] == model
    assert bits_module.count_set(bits) == sum(model)
    start = data.draw(st.integers(0, count - 1))
    end = data.draw(st.integers(start, count))
    for value in (True, False):
        expected = next((i for i in range(start, end) if model[i] is value), end)
        assert bits_module.next_with(bits, start, end, value) == expected
    assert bits_module.all_set(bits, start, end) == all(model[start:end])
    # Extents of an image whose size ends inside the last granule, at 8-byte granules.
    size = count * 8 - data.draw(st.integers(0, 7))
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    assert bits_module.extents_of(bits, 3, size, offset, length) == model_extents(model, 3, size, offset, length)


# --- The filter against a model -------------------------------------------------------------------------------------

SIZE = 1 * MIB + 12345  # ends inside a granule of every granularity
GRANULARITIES = (4 * KIB, 8 * KIB, 64 * KIB)
NAMES = ("a", "b", "c")


def granules(offset: int, length: int, granularity: int) -> set[int]:
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1)) if length else set()


class BitmapModel(RuleBasedStateMachine):
    """The filter over a memory device (bitmaps in memory, or in a sidecar directory, reopened now and then)
    against sets of dirty granules and a bytearray of the data."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="nbdproto-bitmaps-")
        self.device = MemoryDevice(SIZE)
        self.filter = self._open()
        self.data = bytearray(SIZE)
        self.dirty: dict[str, tuple[int, set[int]]] = {}

    def _open(self) -> DirtyBitmapFilter:
        return DirtyBitmapFilter(_Unclosed(self.device), SidecarBitmapStore(self.directory))

    def teardown(self) -> None:
        self.filter.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    ranges = st.integers(0, SIZE - 1).flatmap(lambda o: st.tuples(st.just(o), st.integers(1, min(SIZE - o, 300_000))))

    def _touched(self, offset: int, length: int) -> None:
        for granularity, dirty in self.dirty.values():
            dirty |= granules(offset, length, granularity)

    @rule(where=ranges, byte=st.integers(1, 255))
    def write(self, where: tuple[int, int], byte: int) -> None:
        offset, length = where
        self.filter.pwrite(memoryview(bytes([byte]) * length), offset)
        self.data[offset : offset + length] = bytes([byte]) * length
        self._touched(offset, length)

    @rule(where=ranges, trim=st.booleans())
    def zero_or_trim(self, where: tuple[int, int], trim: bool) -> None:
        offset, length = where
        if trim:
            self.filter.trim(offset, length)
        else:
            self.filter.write_zeroes(offset, length)
        self.data[offset : offset + length] = bytes(length)  # a memory device's trim reads back as zeroes
        self._touched(offset, length)

    @rule(name=st.sampled_from(NAMES), granularity=st.sampled_from(GRANULARITIES))
    def add(self, name: str, granularity: int) -> None:
        if name in self.dirty:
            with pytest.raises(BitmapError, match="exists already"):
                self.filter.bitmap_add(name, granularity)
            return
        info = self.filter.bitmap_add(name, granularity)
        assert (info.name, info.granularity, info.dirty_bytes) == (name, granularity, 0)
        self.dirty[name] = (granularity, set())

    @precondition(lambda self: self.dirty)
    @rule(data=st.data())
    def clear(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.dirty)))
        self.filter.bitmap_clear(name)
        self.dirty[name][1].clear()

    @precondition(lambda self: self.dirty)
    @rule(data=st.data())
    def remove(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.dirty)))
        self.filter.bitmap_remove(name)
        del self.dirty[name]
        with pytest.raises(OSError) as raised:
            self.filter.extents(CONTEXT + name, 0, SIZE)
        assert raised.value.errno == errno.EINVAL

    @rule()
    def restart(self) -> None:
        self.filter.close()
        self.filter = self._open()

    @precondition(lambda self: self.dirty)
    @rule(data=st.data(), where=ranges)
    def extents_of_a_range(self, data: Any, where: tuple[int, int]) -> None:
        name = data.draw(st.sampled_from(sorted(self.dirty)))
        granularity, dirty = self.dirty[name]
        model = [i in dirty for i in range(-(-SIZE // granularity))]
        shift = granularity.bit_length() - 1
        got = list(self.filter.extents(CONTEXT + name, *where))
        assert got == model_extents(model, shift, SIZE, *where)

    @invariant()
    def bitmaps_and_data_agree(self) -> None:
        infos = {info.name: info for info in self.filter.bitmap_list()}
        assert set(infos) == set(self.dirty)
        contexts = self.filter.capabilities.meta_contexts
        assert contexts == ("base:allocation", *(CONTEXT + name for name in infos))
        for name, (granularity, dirty) in self.dirty.items():
            whole = sum(min(granularity, SIZE - g * granularity) for g in dirty)
            assert infos[name].dirty_bytes == whole
            runs = self.filter.extents(CONTEXT + name, 0, SIZE)
            position, found = 0, set()
            for length, flag in runs:
                if flag:
                    found |= granules(position, length, granularity)
                position += length
            assert position == SIZE and found == dirty
        read = bytearray(SIZE)
        self.filter.pread_into(memoryview(read), 0)
        assert read == self.data


class _Unclosed(Filter):
    """The memory device, kept when the filter above it is closed (a restart keeps the data)."""

    def close(self) -> None:
        pass


TestBitmapModel = BitmapModel.TestCase
TestBitmapModel.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- Run time: the instant between two requests ----------------------------------------------------------------


class Held(Filter):
    """Writes wait in the device until ``release`` is set; ``entered`` says one is waiting there."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.entered, self.release = threading.Event(), threading.Event()

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        self.entered.set()
        assert self.release.wait(30)
        self.inner.pwrite(data, offset, fua)


def test_a_bitmap_starts_between_two_requests() -> None:
    """A write in flight when a bitmap is added finishes first (the add waits for it, the bitmap does not hold
    it); a write that comes while the add waits is held back and recorded in the new bitmap."""
    held = Held(MemoryDevice(MIB))
    tracked = DirtyBitmapFilter(held)
    first = threading.Thread(target=tracked.pwrite, args=(b"x", 0))
    first.start()
    assert held.entered.wait(30)
    added = threading.Event()
    adder = threading.Thread(target=lambda: (tracked.bitmap_add("b", 4096), added.set()))
    adder.start()
    assert not added.wait(0.3)  # the write in flight holds the bitmap back
    second = threading.Thread(target=tracked.pwrite, args=(b"y", 8192))
    second.start()
    held.release.set()
    for thread in (first, adder, second):
        thread.join(30)
    assert added.is_set()
    assert tracked.extents(CONTEXT + "b", 0, 16384) == [(8192, 0), (4096, 1), (4096, 0)]


def test_a_checkpoint_freezes_one_bitmap_and_starts_the_next_at_one_instant() -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(MIB))
    tracked.bitmap_add("a", 4096)
    tracked.pwrite(b"1", 0)
    with tracked.quiesced():
        frozen = tracked.bitmap_freeze("a")
        tracked.bitmap_add("b", 4096)  # nested: the same instant
    tracked.pwrite(b"2", 4096)
    assert frozen.extents(0, 8192) == [(4096, 1), (4096, 0)]
    assert tracked.extents(CONTEXT + "a", 0, 8192) == [(8192, 1)]
    assert tracked.extents(CONTEXT + "b", 0, 8192) == [(4096, 0), (4096, 1)]
    assert frozen.info().dirty_bytes == 4096


def test_a_quiesce_that_cannot_wait_for_a_stuck_write_times_out_and_the_write_goes_on() -> None:
    held = Held(MemoryDevice(MIB))
    tracked = DirtyBitmapFilter(held)
    writer = threading.Thread(target=tracked.pwrite, args=(b"x", 0))
    writer.start()
    assert held.entered.wait(30)
    with pytest.raises(TimeoutError, match="did not finish"), tracked.quiesced(timeout=0.2):
        pass
    held.release.set()
    writer.join(30)
    tracked.bitmap_add("b", 4096)
    tracked.pwrite(b"y", 4096)
    assert tracked.bitmap_info("b").dirty_bytes == 4096


# --- Group commit and failures of the store ---------------------------------------------------------------------


class RecordingSink:
    """A sink that records each call, holds the first one until ``release`` is set, and fails while
    ``failing``."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self.stored = bytearray()
        self.failing = False
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def write(self, bits: bytearray, spans: Sequence[tuple[int, int]]) -> None:
        self.entered.set()
        assert self.release.wait(30)
        if self.failing:
            raise OSError(errno.EIO, "the store is gone")
        self.calls.append(list(spans))
        self.stored = bytearray(bits)

    def replace(self, record: StoredBitmap) -> None:
        self.stored = bytearray(record.bits)


class RecordingStore(MemoryBitmapStore):
    """Bitmaps kept in RecordingSinks."""

    def __init__(self) -> None:
        self.sinks: dict[str, RecordingSink] = {}

    def create(self, record: StoredBitmap) -> RecordingSink:
        self.sinks[record.name] = RecordingSink()
        return self.sinks[record.name]


def test_first_writes_to_many_granules_share_store_updates_and_none_is_lost() -> None:
    sink = RecordingSink()
    sink.release.clear()
    bitmap = DirtyBitmap("b", 4096, 64 * 4096, sink=sink)
    first = threading.Thread(target=bitmap.mark, args=(0, 1))
    first.start()
    assert sink.entered.wait(30)  # the first writer commits, and is held there
    others = [threading.Thread(target=bitmap.mark, args=(i * 4096, 1)) for i in range(1, 64)]
    for thread in others:
        thread.start()
    wait_until(
        lambda: len(bitmap._waiting) == 63, "63 writers waiting for the next commit"
    )  # every other writer waits for the next commit
    assert bitmap.info().dirty_bytes == 0  # nothing is dirty in memory before the store has it
    sink.release.set()
    for thread in (first, *others):
        thread.join(30)
    assert len(sink.calls) == 2  # one update for the first, one shared by the 63 that waited
    assert bitmap.info().dirty_bytes == 64 * 4096 and bits_module.count_set(sink.stored) == 64
    bitmap.mark(5 * 4096 + 7, 100)  # dirty already: no store update
    assert len(sink.calls) == 2


def test_a_write_whose_granule_cannot_be_recorded_fails_and_never_reaches_the_device() -> None:
    device, store = MemoryDevice(MIB), RecordingStore()
    tracked = DirtyBitmapFilter(device, store)
    tracked.bitmap_add("b", 4096)
    store.sinks["b"].failing = True
    with pytest.raises(OSError) as raised:
        tracked.pwrite(b"x" * 10, 4096)
    assert raised.value.errno == errno.EIO and "cannot record" in str(raised.value)
    assert device.allocated == 0  # nothing was written
    assert tracked.bitmap_info("b").dirty_bytes == 0
    store.sinks["b"].failing = False
    tracked.pwrite(b"x" * 10, 4096)
    assert tracked.extents(CONTEXT + "b", 0, 12288) == [(4096, 0), (4096, 1), (4096, 0)]


# --- Names, sizes, growth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "a:b", "x" * 201, "sp ace", "é"])
def test_bad_bitmap_names_are_refused(name: str) -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(MIB))
    with pytest.raises(BitmapError, match="bitmap name"):
        tracked.bitmap_add(name)


@pytest.mark.parametrize("granularity", [0, 512, 2048, 3 * 4096, 1 << 32, -4096])
def test_bad_granularities_are_refused(granularity: int) -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(MIB))
    with pytest.raises(BitmapError, match="power of two from 4K"):
        tracked.bitmap_add("b", granularity)


def test_unknown_bitmaps_are_errors_and_names_the_device_offers_are_taken() -> None:
    tracked = DirtyBitmapFilter(OffersABitmap(MemoryDevice(MIB)))
    for call in (tracked.bitmap_clear, tracked.bitmap_remove, tracked.bitmap_freeze, tracked.bitmap_info):
        with pytest.raises(BitmapError, match="no bitmap named 'nope'"):
            call("nope")
    with pytest.raises(BitmapError, match="already offers"):
        tracked.bitmap_add("upstream")
    assert tracked.extents(CONTEXT + "upstream", 0, 100) == [(100, 1)]  # the device's own, passed through


class OffersABitmap(Filter):
    """A device that serves a bitmap of its own (as a remote qemu-nbd export does)."""

    def _capabilities_over(self, inner: Any) -> Any:
        from dataclasses import replace

        return replace(inner, meta_contexts=(*inner.meta_contexts, CONTEXT + "upstream"))

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        return [(length, 1)] if context == CONTEXT + "upstream" else self.inner.extents(context, offset, length)


class Growing(Filter):
    """A device that shows only ``size`` bytes of a bigger memory device, until it grows (a remote export that
    was resized)."""

    def __init__(self, size: int) -> None:
        super().__init__(MemoryDevice(4 * MIB))
        self.shown = size

    @property
    def size(self) -> int:
        return self.shown


@pytest.mark.parametrize("noticed_by", ["write", "extents"])
def test_what_a_device_gains_when_it_grows_is_dirty(noticed_by: str) -> None:
    device = Growing(MIB + 100)
    tracked = DirtyBitmapFilter(device)
    tracked.bitmap_add("b", 64 * KIB)
    tracked.pwrite(b"x", 3 * 64 * KIB)
    device.shown = 2 * MIB
    if noticed_by == "write":
        tracked.pwrite(b"y", MIB + MIB // 2)
    # From the old last granule on (it held the old end): new since the bitmap started.
    runs = [(3 * 64 * KIB, 0), (64 * KIB, 1), (MIB - 4 * 64 * KIB, 0), (MIB, 1)]
    assert tracked.extents(CONTEXT + "b", 0, 2 * MIB) == runs
    assert tracked.bitmap_info("b").size == 2 * MIB


# --- Served: the contexts of each handshake -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["threads", "asyncio"])
def test_a_bitmap_added_while_serving_is_offered_to_the_next_client(backend: str) -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(4 * MIB))
    with serve_exports(backend, {"disk": Export(tracked)}) as base:
        uri = base.format("disk")
        assert nt.list_meta_contexts(uri) == ["base:allocation"]
        tracked.bitmap_add("b1")
        tracked.bitmap_add("b2", 4096)
        assert nt.list_meta_contexts(uri) == ["base:allocation", CONTEXT + "b1", CONTEXT + "b2"]
        assert nt.list_meta_contexts(uri, ["qemu:dirty-bitmap:"]) == [CONTEXT + "b1", CONTEXT + "b2"]
        with nt.connect(uri, meta_contexts=["qemu:dirty-bitmap:", "qemu:"]) as client:
            assert dict(client.meta_contexts) == {}  # a wildcard lists, and selects nothing
        with nt.connect(uri, meta_contexts=[CONTEXT + "b2"]) as client:
            client.pwrite(b"x" * 5000, MIB + 10)
            client.zero(100, 3 * MIB)
            runs = client.block_status(4 * MIB, 0, context=CONTEXT + "b2")
            assert [(e.length, e.status) for e in runs] == [(MIB, 0), (8192, 1), (2 * MIB - 8192, 0), (4096, 1),
                                                            (MIB - 4096, 0)]  # fmt: skip
            one = client.block_status(2 * MIB, MIB + 4096, context=CONTEXT + "b2", req_one=True)
            assert [(e.length, e.status) for e in one] == [(4096, 1)]
            tracked.bitmap_remove("b2")
            with pytest.raises(OSError) as raised:
                client.block_status(4096, 0, context=CONTEXT + "b2")
            assert raised.value.errno == errno.EINVAL
        assert nt.list_meta_contexts(uri) == ["base:allocation", CONTEXT + "b1"]


# --- A remote export: whole batches go below -------------------------------------------------------------------


def test_a_remote_exports_batches_are_marked_with_one_store_update_then_sent_whole() -> None:
    with serve_exports("threads", {"up": Export(MemoryDevice(4 * MIB))}) as base:
        store = RecordingStore()
        tracked = DirtyBitmapFilter(NbdDevice(base.format("up")), store)
        assert tracked.call_batch is not None and tracked.dispatch == "batch"
        tracked.bitmap_add("b", 4096)
        read = memoryview(bytearray(5))
        calls = [
            DeviceCall("pwrite", (b"hello", 0, False)),
            DeviceCall("write_zeroes", (MIB, 10000), {"may_trim": True, "fast": False, "fua": False}),
            DeviceCall("trim", (2 * MIB, 1, False)),
            DeviceCall("extents", (CONTEXT + "b", 0, 12288)),
            DeviceCall("pread_into", (read, 0)),
        ]
        results = tracked.call_batch(calls)
        assert results[:3] == [None, None, None] and results[4] is None
        assert results[3] == [(4096, 1), (8192, 0)]
        assert len(store.sinks["b"].calls) == 1  # the batch's three changes: one update of the store
        assert bytes(read) == b"hello"
        assert tracked.bitmap_info("b").dirty_bytes == 4096 + 3 * 4096 + 4096
        store.sinks["b"].failing = True
        results = tracked.call_batch([DeviceCall("pwrite", (b"x", 8192, False)), DeviceCall("pread_into", (read, 0))])
        assert isinstance(results[0], OSError) and results[1] is None  # the change fails, the read goes on
        tracked.close()
