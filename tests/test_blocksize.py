"""BlockSizeFilter over a device with 4 KiB sectors and a 64 KiB request limit (AlignedDevice, which refuses
anything else): any request from a client is carried out with aligned, short enough requests only, the data
matches a bytearray model, and concurrent unaligned writes to one sector lose nothing."""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import pytest
from hypothesis import given, settings

import nbdproto as n
from nbdproto.devices import BlockSizeFilter, FileDevice, MemoryDevice
from tests.filtertools import (
    AlignedDevice,
    SlowReads,
    check_extents,
    operations,
    overlapping_writers,
    run_against_model,
)
from tests.threaded import run_threads

SIZE = 64 * 4096


@settings(max_examples=60, deadline=None)
@given(ops=operations(SIZE, longest=150_000))
def test_any_request_reaches_a_4k_device_aligned_and_reads_back_right(ops: list[Any]) -> None:
    inner = AlignedDevice(SIZE, minimum=4096, maximum=65536)
    device = BlockSizeFilter(inner)
    model = bytearray(SIZE)
    run_against_model(device, model, ops, trim_granularity=4096)
    assert not inner.violations
    whole = memoryview(bytearray(SIZE))
    inner.inner.pread_into(whole, 0)  # the memory behind the checks
    assert bytes(whole) == model


def test_clients_are_offered_any_alignment_and_large_requests() -> None:
    inner = AlignedDevice(SIZE + 1000)  # the unaligned tail cannot be used
    device = BlockSizeFilter(inner)
    caps = device.capabilities
    assert (caps.minimum_block_size, caps.preferred_block_size, caps.maximum_payload) == (1, 4096, 32 << 20)
    assert device.size == SIZE and not caps.can_resize
    export = n.ExportSpec(device, read_only=False).export("d")
    assert export.minimum_block_size == 1 and export.size == SIZE
    with pytest.raises(ValueError, match="not a multiple of the device's own 4096"):
        BlockSizeFilter(inner, minimum=512)
    with pytest.raises(ValueError, match="multiple of the minimum"):
        BlockSizeFilter(inner, maximum=5000)


def test_one_byte_writes_are_read_modify_writes_of_one_sector() -> None:
    inner = AlignedDevice(SIZE)
    device = BlockSizeFilter(inner)
    device.pwrite(b"a", 4097)
    assert inner.calls == [("read", 4096, 4096), ("write", 4096, 4096)]
    inner.calls.clear()
    device.pwrite(b"b" * 10000, 100)  # head RMW, an aligned middle, tail RMW
    assert inner.calls == [
        ("read", 0, 4096),
        ("write", 0, 4096),
        ("write", 4096, 4096),
        ("read", 8192, 4096),
        ("write", 8192, 4096),
    ]
    inner.calls.clear()
    device.pwrite(os.urandom(200_000), 0)  # aligned but over the device's 64 KiB: split
    assert [length for _, _, length in inner.calls if length > 65536] == []
    buffer = memoryview(bytearray(3))
    device.pread_into(buffer, 4096 * 3 - 1)
    whole = memoryview(bytearray(SIZE))
    inner.inner.pread_into(whole, 0)
    assert bytes(buffer) == bytes(whole[4096 * 3 - 1 : 4096 * 3 + 2])
    assert not inner.violations


def test_zero_trim_cache_and_block_status_are_aligned_or_rounded() -> None:
    inner = AlignedDevice(SIZE)
    device = BlockSizeFilter(inner)
    device.pwrite(b"\xff" * SIZE, 0)
    with pytest.raises(OSError) as info:
        device.write_zeroes(10, 100, fast=True)  # would need a read-modify-write: not fast
    assert info.value.errno == errno.ENOTSUP
    device.write_zeroes(4096, 8192, fast=True)
    device.write_zeroes(100, 10)
    device.trim(5000, 10000)  # only the whole sector 8192..12288 inside it is trimmed
    device.cache(1, 2)
    model = bytearray(b"\xff" * SIZE)
    model[4096:12288] = bytes(8192)
    model[100:110] = bytes(10)
    whole = memoryview(bytearray(SIZE))
    device.pread_into(whole, 0)
    assert bytes(whole) == model
    extents = device.extents(n.BASE_ALLOCATION, 5000, 9000)
    assert sum(length for length, _ in extents) <= 9000 and extents[0][0] > 0
    check_extents(extents, model, 5000, 9000)
    assert not inner.violations


def test_aligned_reads_use_the_inner_devices_views(tmp_path: Any) -> None:
    path = tmp_path / "d.img"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    device = BlockSizeFilter(FileDevice(path), minimum=4096, maximum=65536)
    assert bytes(device.read_view(4096, 8192)) == data[4096:12288]
    assert device.read_view(4097, 8192) is None and device.read_view(0, 131072) is None
    device.close()


def test_a_plain_device_gets_only_split_requests() -> None:
    inner = MemoryDevice(SIZE)
    device = BlockSizeFilter(inner, maximum=4096)
    data = os.urandom(50_000)
    device.pwrite(data, 3)
    buffer = memoryview(bytearray(50_000))
    device.pread_into(buffer, 3)
    assert bytes(buffer) == data


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(3))
def test_threads_writing_bytes_of_the_same_sectors_lose_nothing(seed: int) -> None:
    # Eight threads write disjoint ranges of a few bytes, many to each 4 KiB sector: each is a read-modify-write
    # of its sector, and a slow read lets the others run in the middle of it.
    inner = AlignedDevice(16 * 4096)
    device = BlockSizeFilter(SlowReads(inner, 0.0002))
    pieces = [(offset, min(700, 16 * 4096 - offset)) for offset in range(0, 16 * 4096, 700)]
    random.Random(seed).shuffle(pieces)
    model = bytearray(16 * 4096)
    for number, (offset, length) in enumerate(pieces):
        model[offset : offset + length] = bytes([number % 8 + 1]) * length

    def writer(i: int) -> None:
        for number, (offset, length) in enumerate(pieces):
            if number % 8 == i:
                if number % 5 == 0:  # some aligned-range zeroes and writes in between
                    device.write_zeroes(offset, length)
                device.pwrite(bytes([i + 1]) * length, offset)

    run_threads(writer, 8)
    whole = memoryview(bytearray(16 * 4096))
    device.pread_into(whole, 0)
    assert bytes(whole) == model
    assert not inner.violations


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(6))
def test_threads_writing_overlapping_ranges_leave_only_their_own_bytes(seed: int) -> None:
    inner = AlignedDevice(64 * 4096)
    inner.inner.pwrite(b"\xee" * inner.size, 0)
    overlapping_writers(BlockSizeFilter(SlowReads(inner, 0.0002)), seed)
    assert not inner.violations
