"""Checkpoints and their backup views (DirtyBitmapFilter.checkpoint, BackupView): against a model of the disk
under any sequence of writes, zeroes, trims, checkpoints and releases; with writers and readers at once; the
limit that breaks a view (and never a client's write); and where views keep their copies (memory, a scratch
file no name reaches, objects beside an S3 image)."""

from __future__ import annotations

import errno
import os
import threading
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdproto.devices import Filter, MemoryDevice, S3Device, S3Settings
from nbdproto.devices.bitmaps import (
    BitmapError,
    DirtyBitmapFilter,
    MemoryAside,
    ObjectAside,
    ScratchFileAside,
    aside_store_for,
)
from tests.s3server import SeaweedFS

pytestmark = pytest.mark.timeout(120)
KIB, MIB = 1 << 10, 1 << 20
CONTEXT = "qemu:dirty-bitmap:"


def read_all(device: Any, size: int) -> bytes:
    buffer = bytearray(size)
    device.pread_into(memoryview(buffer), 0)
    return bytes(buffer)


def dirty_granules(extents: list[tuple[int, int]], granularity: int) -> set[int]:
    out, position = set(), 0
    for length, flags in extents:
        if flags & 1:
            out |= set(range(position // granularity, -(-(position + length) // granularity)))
        position += length
    return out


# --- Against a model --------------------------------------------------------------------------------------------

SIZE = 96 * KIB
GRANULE = 4 * KIB
NAMES = ("a", "b", "c", "d")


class CheckpointMachine(RuleBasedStateMachine):
    """The filter over a memory disk, and a model: the disk's bytes, each bitmap's granules written since it
    started, and each view's bytes and frozen bitmap as of its checkpoint."""

    @initialize()
    def start(self) -> None:
        self.tracked = DirtyBitmapFilter(MemoryDevice(SIZE))
        self.disk = bytearray(SIZE)
        self.bitmaps: dict[str, set[int]] = {}
        self.views: dict[str, tuple[bytes, str | None, set[int] | None]] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.tracked.close()

    def _changed(self, offset: int, length: int) -> None:
        granules = set(range(offset // GRANULE, (offset + length - 1) // GRANULE + 1))
        for dirty in self.bitmaps.values():
            dirty |= granules

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 20 * KIB), zero=st.booleans())
    def write(self, offset: int, length: int, zero: bool) -> None:
        length = min(length, SIZE - offset)
        self.counter += 1
        data = bytes(length) if zero else bytes([self.counter % 255 + 1]) * length
        self.tracked.pwrite(data, offset)
        self.disk[offset : offset + length] = data
        self._changed(offset, length)

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 40 * KIB), trim=st.booleans())
    def zero(self, offset: int, length: int, trim: bool) -> None:
        length = min(length, SIZE - offset)
        if trim:
            self.tracked.trim(offset, length)  # a memory disk's trim zeroes what it covers
        else:
            self.tracked.write_zeroes(offset, length)
        self.disk[offset : offset + length] = bytes(length)
        self._changed(offset, length)

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def checkpoint(self, name: str, data: Any) -> None:
        since = data.draw(st.sampled_from([None, *sorted(self.bitmaps)]))
        if name in self.bitmaps or name in self.views:
            with pytest.raises(BitmapError):
                self.tracked.checkpoint(name, since, granularity=GRANULE)
            return
        self.tracked.checkpoint(name, since, granularity=GRANULE)
        self.views[name] = (bytes(self.disk), since, None if since is None else set(self.bitmaps[since]))
        self.bitmaps[name] = set()

    @precondition(lambda self: bool(self.views))
    @rule(data=st.data())
    def release(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.views)))
        self.tracked.release(name)
        del self.views[name]
        with pytest.raises(BitmapError):
            self.tracked.view(name)

    @precondition(lambda self: bool(self.bitmaps))
    @rule(data=st.data())
    def remove_bitmap(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.bitmaps)))
        self.tracked.bitmap_remove(name)  # a view since it keeps its frozen copy
        del self.bitmaps[name]

    @invariant()
    def views_hold_the_disk_as_it_was(self) -> None:
        for name, (snapshot, since, frozen) in self.views.items():
            view = self.tracked.view(name)
            assert read_all(view, SIZE) == snapshot
            position = 0
            for length, flags in view.extents("base:allocation", 0, SIZE):
                if flags & 2:  # said to read as zero: it must
                    assert snapshot[position : position + length] == bytes(length)
                position += length
            assert position == SIZE
            if since is not None:
                assert frozen is not None
                assert dirty_granules(list(view.extents(CONTEXT + since, 0, SIZE)), GRANULE) == frozen

    @invariant()
    def bitmaps_hold_what_changed(self) -> None:
        for name, dirty in self.bitmaps.items():
            assert dirty_granules(list(self.tracked.extents(CONTEXT + name, 0, SIZE)), GRANULE) == dirty


CheckpointMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_views_and_bitmaps_match_a_model = CheckpointMachine.TestCase


# --- Writers and readers at once ---------------------------------------------------------------------------------


def test_a_view_read_while_writers_overwrite_the_disk_is_the_disk_at_the_checkpoint() -> None:
    size = 8 * MIB
    tracked = DirtyBitmapFilter(MemoryDevice(size))
    tracked.pwrite(os.urandom(size), 0)
    snapshot = read_all(tracked, size)
    view = tracked.checkpoint("now", granularity=64 * KIB)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = __import__("random").Random(seed)
        try:
            while not stop.is_set():
                offset = rng.randrange(size - 70000)
                if rng.random() < 0.2:
                    tracked.write_zeroes(offset, rng.randrange(1, 70000))
                else:
                    tracked.pwrite(os.urandom(rng.randrange(1, 70000)), offset)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in writers:
        thread.start()
    try:
        for _ in range(3):  # the whole view, three times over, in reads of several sizes, while they write
            for step in (4096, 65536 + 512, 1 << 20):
                copy = bytearray(size)
                for offset in range(0, size, step):
                    part = memoryview(copy)[offset : offset + step]
                    view.pread_into(part, offset)
                assert copy == snapshot
    finally:
        stop.set()
        for thread in writers:
            thread.join(30)
    assert not errors
    assert view.status().copied_bytes > 0 and view.status().broken is None
    tracked.close()


# --- The limit ---------------------------------------------------------------------------------------------------


def test_a_view_past_its_limit_breaks_and_the_writes_go_on() -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(MIB))
    tracked.pwrite(b"\x01" * MIB, 0)
    view = tracked.checkpoint("small", granularity=4 * KIB, limit=8 * KIB)
    tracked.pwrite(b"\x02" * 8 * KIB, 0)  # two granules: exactly the limit
    assert view.status().copied_bytes == 8 * KIB and view.status().broken is None
    assert read_all(view, 16 * KIB) == b"\x01" * 16 * KIB
    tracked.pwrite(b"\x03" * 4 * KIB, 100 * KIB)  # one more: the view breaks, the write does not
    assert read_all(tracked, MIB)[100 * KIB : 104 * KIB] == b"\x03" * 4 * KIB
    status = view.status()
    assert status.broken is not None and "limit of 8192 bytes" in status.broken
    with pytest.raises(OSError) as raised:
        read_all(view, 4096)
    assert raised.value.errno == errno.EIO and "broke" in str(raised.value)
    tracked.pwrite(b"\x04", 200 * KIB)  # a broken view copies nothing more
    assert view.status().copied_bytes == 8 * KIB
    tracked.release("small")
    assert tracked.bitmap_info("small").dirty_bytes == 4 * 4 * KIB  # its bitmap goes on


def test_zero_granules_take_no_room_aside() -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(4 * MIB))
    view = tracked.checkpoint("z", granularity=64 * KIB, limit=0)
    tracked.pwrite(b"x" * 3 * MIB, 0)  # over a disk of zeroes: noted as zero, nothing kept
    status = view.status()
    assert status.broken is None and status.copied_bytes == 0 and status.zero_granules == 48
    assert read_all(view, 4 * MIB) == bytes(4 * MIB)
    assert list(view.extents("base:allocation", 0, 4 * MIB)) == [(3 * MIB, 2), (MIB, 3)]


class Resizable(Filter):
    """A memory disk that can be resized: what a shrink takes away is gone (zeroes if it grows again)."""

    def __init__(self, size: int) -> None:
        super().__init__(MemoryDevice(4 * MIB))
        self.shown = size

    @property
    def size(self) -> int:
        return self.shown

    def resize(self, size: int) -> None:
        if size < self.shown:
            self.inner.write_zeroes(size, self.shown - size)
        self.shown = size


def test_a_released_view_fails_its_reads_and_a_shrink_keeps_what_the_view_needs() -> None:
    tracked = DirtyBitmapFilter(Resizable(MIB))
    tracked.pwrite(b"\x05" * MIB, 0)
    view = tracked.checkpoint("s", granularity=4 * KIB)
    tracked.resize(MIB // 2)
    assert read_all(view, MIB) == b"\x05" * MIB
    released = tracked.release("s")
    assert released.copied_bytes == MIB // 2
    with pytest.raises(OSError, match="released"):
        read_all(view, 10)
    with pytest.raises(BitmapError, match="no checkpoint view"):
        tracked.release("s")


def test_bad_checkpoints_are_refused_before_anything_changes() -> None:
    tracked = DirtyBitmapFilter(MemoryDevice(MIB))
    tracked.bitmap_add("a")
    for name, since, message in (("a", None, "exists already"), ("x", "nope", "no bitmap named"), (".x", None, "name")):
        with pytest.raises(BitmapError, match=message):
            tracked.checkpoint(name, since)
    with pytest.raises(BitmapError, match="granularity"):
        tracked.checkpoint("y", granularity=1000)
    assert [info.name for info in tracked.bitmap_list()] == ["a"] and tracked.views() == []
    view = tracked.checkpoint("b", "a")
    assert view.granularity == 64 * KIB and view.capabilities.meta_contexts == ("base:allocation", CONTEXT + "a")
    assert not view.capabilities.can_write
    with pytest.raises(OSError) as raised:
        view.pwrite(b"x", 0)
    assert raised.value.errno == errno.EPERM
    tracked.close()
    with pytest.raises(OSError, match="released"):
        read_all(view, 1)


# --- Where copies go ------------------------------------------------------------------------------------------


def test_a_scratch_file_is_reached_by_no_name_and_holds_the_copies(tmp_path: Any) -> None:
    aside = ScratchFileAside(tmp_path, 64 * KIB)
    assert os.listdir(tmp_path) == []
    tracked = DirtyBitmapFilter(MemoryDevice(2 * MIB))
    tracked.pwrite(b"\x07" * 2 * MIB, 0)
    view = tracked.checkpoint("f", aside=aside)
    tracked.pwrite(b"\x08" * MIB, 512 * KIB)
    assert view.status().where == str(tmp_path) and view.status().copied_bytes == MIB
    assert read_all(view, 2 * MIB) == b"\x07" * 2 * MIB
    assert os.listdir(tmp_path) == []
    tracked.release("f")
    with pytest.raises(OSError):
        aside.put(0, b"x")


def test_copies_go_to_memory_for_small_exports_and_a_scratch_file_beside_large_ones(tmp_path: Any) -> None:
    assert isinstance(aside_store_for(MemoryDevice(MIB), "v", MIB, 65536), MemoryAside)
    large = aside_store_for(MemoryDevice(1 << 30), "v", 1 << 30, 65536, tmp_path)
    assert isinstance(large, ScratchFileAside) and large.where == str(tmp_path)
    large.close()


def test_an_s3_image_keeps_its_views_copies_as_objects_and_removes_them(s3_store: SeaweedFS) -> None:
    key = f"views-{uuid.uuid4().hex[:8]}"
    device = S3Device(s3_store.bucket, key, size=4 * MIB, object_size=64 * KIB,
                      settings=S3Settings(endpoint=s3_store.endpoint), lease=None)  # fmt: skip
    prefix = f"{key}/views/v/"
    s3_store.client().put_object(Bucket=s3_store.bucket, Key=prefix + "0" * 16, Body=b"left by a crash")
    with DirtyBitmapFilter(device) as tracked:
        tracked.pwrite(b"\x09" * MIB, 0)
        view = tracked.checkpoint("v", aside=ObjectAside(device.object_store, prefix))
        assert s3_store.keys(prefix) == {}
        tracked.pwrite(b"\x0a" * 100, 70 * KIB)
        assert sorted(s3_store.keys(prefix)) == [prefix + f"{1:016x}"]
        assert read_all(view, MIB) == b"\x09" * MIB
        tracked.release("v")
        assert s3_store.keys(prefix) == {}
