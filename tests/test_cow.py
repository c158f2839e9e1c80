"""CowFilter against a model: a plain MemoryDevice holding the base's bytes that receives the same operations.
The base must never change; block status must be honest; writes from many threads must not lose each other."""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdproto as n
from nbdproto.devices import CowFilter, FileDevice, MemoryDevice
from tests.filtertools import NoWrites, SlowReads, check_extents, operations, overlapping_writers, run_against_model
from tests.threaded import run_threads

HOLE = int(n.AllocationState.HOLE | n.AllocationState.ZERO)
SIZE = 512 * 1024 + 3000  # not a multiple of any block size: the last block is partial


def make_base(size: int = SIZE, seed: int = 1) -> tuple[MemoryDevice, bytes]:
    """A base with data in some places and holes in others, and its bytes."""
    rng = random.Random(seed)
    base = MemoryDevice(size)
    for _ in range(6):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 100_000), size - offset)
        base.pwrite(rng.randbytes(length), offset)
    whole = memoryview(bytearray(size))
    base.pread_into(whole, 0)
    return base, bytes(whole)


def contents(device: Any) -> bytes:
    whole = memoryview(bytearray(device.size))
    device.pread_into(whole, 0)
    return bytes(whole)


@pytest.mark.parametrize("block_size", [4096, 65536])
@settings(max_examples=40, deadline=None)
@given(ops=operations(SIZE), seed=st.integers(0, 3))
def test_cow_behaves_like_a_copy_of_the_base_and_never_changes_it(block_size: int, ops: list[Any], seed: int) -> None:
    base, original = make_base(seed=seed)
    device = CowFilter(NoWrites(base), block_size=block_size)  # NoWrites: any write reaching the base fails
    model = bytearray(original)
    run_against_model(device, model, ops)
    assert contents(base) == original


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations(SIZE, max_size=15))
def test_a_file_overlay_behaves_the_same(tmp_path: Any, ops: list[Any]) -> None:
    base, original = make_base()
    overlay = tmp_path / f"overlay-{os.urandom(4).hex()}"
    device = CowFilter(base, overlay=overlay)
    try:
        run_against_model(device, bytearray(original), ops)
        assert contents(base) == original
        assert overlay.stat().st_size == SIZE
    finally:
        device.close()


def test_block_status_merges_the_overlay_and_the_base() -> None:
    block = 65536
    base = MemoryDevice(16 * block)
    base.pwrite(b"d" * block, 2 * block)  # base: data in block 2 only
    device = CowFilter(base)
    assert device.extents(n.BASE_ALLOCATION, 0, 16 * block) == [(2 * block, HOLE), (block, 0), (13 * block, HOLE)]
    device.pwrite(b"w" * 10, 5 * block + 100)  # block 5 copied up and written: data
    device.write_zeroes(2 * block, block)  # block 2 zeroed in the overlay: a hole
    device.pwrite(b"w" * block, 3 * block)  # block 3 written whole
    assert device.extents(n.BASE_ALLOCATION, 0, 16 * block) == [
        (3 * block, HOLE),
        (block, 0),
        (block, HOLE),
        (block, 0),
        (10 * block, HOLE),
    ]
    # A range starting inside a run, and a base without block status (all data).
    assert device.extents(n.BASE_ALLOCATION, 3 * block + 5, 10) == [(10, 0)]
    blind = CowFilter(NoContexts(MemoryDevice(4 * block)))
    blind.write_zeroes(0, block)
    assert blind.extents(n.BASE_ALLOCATION, 0, 4 * block) == [(block, HOLE), (3 * block, 0)]
    assert blind.capabilities.meta_contexts == (n.BASE_ALLOCATION,)
    check_extents(device.extents(n.BASE_ALLOCATION, 0, 16 * block), contents(device), 0, 16 * block)


class NoContexts(NoWrites):
    def _capabilities_over(self, inner: n.DeviceCapabilities) -> n.DeviceCapabilities:
        from dataclasses import replace

        return replace(super()._capabilities_over(inner), meta_contexts=())


def test_the_first_partial_write_copies_the_block_up_once() -> None:
    base, original = make_base(size=4 * 65536)
    device = CowFilter(base)
    device.pwrite(b"x", 70000)
    assert device.written_blocks == 1
    assert contents(device) == original[:70000] + b"x" + original[70001:]
    device.pwrite(b"yy", 65536)  # the same block: no second copy-up, and the first write stays
    assert device.written_blocks == 1
    assert contents(device)[65536:70001] == b"yy" + original[65538:70000] + b"x"
    device.trim(0, 4 * 65536)
    assert contents(device) == bytes(4 * 65536) and contents(base) == original


def test_a_base_of_holes_costs_the_overlay_nothing_to_copy_up() -> None:
    device = CowFilter(MemoryDevice(1 << 30))
    device.pwrite(b"x", 12345)
    assert device.overlay.allocated == 65536  # type: ignore[attr-defined]
    device.write_zeroes(1 << 20, 100)  # copy-up of a hole writes nothing
    assert device.overlay.allocated == 65536  # type: ignore[attr-defined]


def test_reads_of_untouched_ranges_use_the_bases_views(tmp_path: Any) -> None:
    path = tmp_path / "base.img"
    data = os.urandom(4 * 65536)
    path.write_bytes(data)
    base = FileDevice(path, read_only=True)
    device = CowFilter(base)
    assert bytes(device.read_view(0, 4 * 65536)) == data
    device.pwrite(b"x", 65536)
    assert device.read_view(0, 4 * 65536) is None  # a written block: pread_into merges the sides
    assert bytes(device.read_view(2 * 65536, 65536)) == data[2 * 65536 : 3 * 65536]
    device.close()
    assert path.read_bytes() == data


def test_a_file_overlay_must_be_new_or_empty(tmp_path: Any) -> None:
    taken = tmp_path / "taken"
    taken.write_bytes(b"a disk image")
    with pytest.raises(OSError) as info:
        CowFilter(MemoryDevice(4096), overlay=taken)
    assert info.value.errno == errno.EEXIST and info.value.filename == str(taken)
    assert taken.read_bytes() == b"a disk image"
    empty = tmp_path / "empty"
    empty.touch()
    CowFilter(MemoryDevice(4096), overlay=empty).close()
    with pytest.raises(ValueError, match="power of two"):
        CowFilter(MemoryDevice(4096), block_size=3000)
    with pytest.raises(OSError) as resize:
        CowFilter(MemoryDevice(4096)).resize(8192)
    assert resize.value.errno == errno.ENOTSUP


def test_cow_flush_and_fua_reach_a_file_overlay(tmp_path: Any) -> None:
    device = CowFilter(MemoryDevice(1 << 20), overlay=tmp_path / "o")
    device.pwrite(b"x" * 10, 0, fua=True)
    device.flush()
    assert (tmp_path / "o").read_bytes()[:10] == b"x" * 10  # the overlay holds the block at its own offset
    device.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_", range(3))
def test_threads_writing_into_shared_blocks_lose_nothing(round_: int) -> None:
    # Eight threads write disjoint byte ranges that share blocks, each first write to a block racing the
    # others' copy-ups (slow base reads widen the window): every byte must end up as its writer wrote it.
    base, original = make_base(size=16 * 4096, seed=round_)
    device = CowFilter(SlowReads(base), block_size=4096)
    model = bytearray(original)
    pieces = [(offset, min(300, len(model) - offset)) for offset in range(0, len(model), 300)]
    rng = random.Random(round_)
    rng.shuffle(pieces)
    for number, (offset, length) in enumerate(pieces):
        model[offset : offset + length] = bytes([number % 8 + 1]) * length

    def writer(i: int) -> None:
        for number, (offset, length) in enumerate(pieces):
            if number % 8 == i:
                device.pwrite(bytes([i + 1]) * length, offset)

    run_threads(writer, 8)
    assert contents(device) == model
    assert contents(base) == original


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_threads_writing_overlapping_ranges_leave_only_their_own_bytes(seed: int) -> None:
    base = MemoryDevice(64 * 4096)
    base.pwrite(b"\xee" * base.size, 0)
    overlapping_writers(CowFilter(SlowReads(base), block_size=4096), seed)
    assert contents(base) == b"\xee" * base.size


@settings(max_examples=150, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 40_000)), max_size=6),
    probes=st.lists(st.tuples(st.integers(0, 150_000), st.integers(1, 40_000)), max_size=6),
)
def test_the_block_map_is_a_set_of_blocks(ranges: list[tuple[int, int]], probes: list[tuple[int, int]]) -> None:
    from nbdproto.devices._blockmap import BlockMap

    blocks, model = BlockMap(), set()
    for start, length in ranges:
        blocks.add_range(start, start + length)
        model.update(range(start, start + length))
    assert blocks.count() == len(model) and bool(blocks) == bool(model)
    for start, length in probes:
        stop = start + length
        assert (start in blocks) == (start in model)
        expected = next((b for b in range(start + 1, stop) if (b in model) != (start in model)), stop)
        assert blocks.run_end(start, stop) == expected
        assert blocks.all_in(start, stop) == all(b in model for b in range(start, stop))


def test_trimming_a_huge_disk_costs_a_bitmap() -> None:
    import tracemalloc

    device = CowFilter(MemoryDevice(1 << 40))  # 1 TiB, 16 Mi blocks of 64 KiB
    tracemalloc.start()
    for offset in range(0, 1 << 40, 1 << 32):
        device.trim(offset, 1 << 32)
    used = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert device.written_blocks == 1 << 24 and used < 4 << 20  # 2 MiB of bits, no page of data
    assert device.extents(n.BASE_ALLOCATION, 0, 1 << 32) == [(1 << 32, HOLE)]
