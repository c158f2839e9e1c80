"""What the filter tests share: test devices that check how they are called, and a bytearray model to run random
operations against.

``AlignedDevice`` is a disk with large sectors: it refuses (EINVAL, and records) any request not aligned to its
minimum block size or longer than its maximum, the way a device with 4 KiB sectors would. ``SlowReads`` gives up
the GIL after every read, so a read-modify-write that is not properly locked loses writes in a threads test.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

import nbdproto as n
from nbdproto import Buffer, DeviceCapabilities
from nbdproto.devices import Filter, MemoryDevice

ZERO = int(n.AllocationState.ZERO)


class AlignedDevice(Filter):
    """A MemoryDevice of ``size`` bytes that accepts only ``minimum``-aligned requests, reads and writes of at most
    ``maximum`` bytes; every request that breaks this is recorded in ``violations`` and fails with EINVAL."""

    def __init__(self, size: int, minimum: int = 4096, maximum: int = 65536) -> None:
        super().__init__(MemoryDevice(size))
        self.minimum, self.maximum = minimum, maximum
        self.violations: list[tuple[str, int, int]] = []
        self.calls: list[tuple[str, int, int]] = []

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        return replace(
            inner,
            minimum_block_size=self.minimum,
            preferred_block_size=max(4096, self.minimum),
            maximum_payload=self.maximum,
        )

    def _check(self, call: str, offset: int, length: int, data: bool) -> None:
        self.calls.append((call, offset, length))
        if (offset | length) % self.minimum or (data and length > self.maximum):
            self.violations.append((call, offset, length))
            raise OSError(errno.EINVAL, f"{call} {offset}+{length} breaks {self.minimum}/{self.maximum}")

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._check("read", offset, len(buffer), True)
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        self._check("write", offset, memoryview(data).nbytes, True)
        self.inner.pwrite(data, offset, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check("trim", offset, length, False)
        self.inner.trim(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check("zero", offset, length, False)
        self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        self._check("cache", offset, length, False)
        self.inner.cache(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._check("extents", offset, length, False)
        return self.inner.extents(context, offset, length)


class SlowReads(Filter):
    """``inner`` whose reads sleep ``seconds`` after taking the data: other threads run between the read and the
    write of any read-modify-write, which then writes back what it read unless a lock kept them out."""

    def __init__(self, inner: Any, seconds: float = 0.0005) -> None:
        super().__init__(inner)
        self.seconds = seconds

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.inner.pread_into(buffer, offset)
        time.sleep(self.seconds)  # the device under test is slow on purpose: other threads run meanwhile


class NoWrites(Filter):
    """``inner`` claiming to be a read-only device that can neither trim nor zero (and really cannot write)."""

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        return replace(inner, can_write=False, can_trim=False, can_zero=False, can_fast_zero=False, can_fua=False)

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        raise AssertionError("a write reached a device that cannot write")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise AssertionError("a trim reached a device that cannot trim")

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        raise AssertionError("a write-zeroes reached a device that cannot zero")


def operations(size: int, longest: int = 70_000, max_size: int = 30) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Random (operation, offset, length) lists over a device of ``size`` bytes; lengths are clipped to fit."""
    return st.lists(
        st.tuples(
            st.sampled_from(["write", "write", "zero", "zero-no-hole", "trim", "read", "read", "extents", "flush"]),
            st.integers(0, size - 1),
            st.integers(1, longest),
        ),
        max_size=max_size,
    )


def check_extents(extents: Sequence[tuple[int, int]], model: bytes | bytearray, offset: int, length: int) -> None:
    """Block status that is well formed (runs of positive length, not past the range) and honest: a run
    reported as zero reads as zero in the model."""
    assert extents, "block status must answer at least one run"
    position = offset
    for run_length, flags in extents:
        assert run_length > 0
        assert position + run_length <= offset + length, "a run goes past the range asked for"
        if flags & ZERO:
            assert not any(model[position : position + run_length]), f"a zero run at {position} holds data"
        position += run_length


def run_against_model(
    device: Any,
    model: bytearray,
    ops: list[tuple[str, int, int]],
    *,
    trim_granularity: int = 1,
    seed: int = 0,
) -> None:
    """Apply ``ops`` to ``device`` and to ``model`` (a bytearray of the same size), checking every read and block
    status against the model, then the whole device. Trims zero the model's range rounded in to
    ``trim_granularity`` (a device may ignore the unaligned edges of a trim)."""
    size = len(model)
    for number, (op, offset, length) in enumerate(ops):
        length = min(length, size - offset)
        if op == "write":
            data = os.urandom(length)
            device.pwrite(data, offset, fua=number % 3 == 0)
            model[offset : offset + length] = data
        elif op in ("zero", "zero-no-hole"):
            device.write_zeroes(offset, length, may_trim=op == "zero", fua=number % 2 == 0)
            model[offset : offset + length] = bytes(length)
        elif op == "trim":
            device.trim(offset, length)
            start = -(-offset // trim_granularity) * trim_granularity
            stop = (offset + length) // trim_granularity * trim_granularity
            if start < stop:
                model[start:stop] = bytes(stop - start)
        elif op == "read":
            buffer = memoryview(bytearray(length))
            device.pread_into(buffer, offset)
            assert bytes(buffer) == model[offset : offset + length], f"read {offset}+{length} differs"
        elif op == "extents":
            check_extents(device.extents(n.BASE_ALLOCATION, offset, length), model, offset, length)
        else:
            device.flush()
    whole = memoryview(bytearray(size))
    device.pread_into(whole, 0)
    assert bytes(whole) == model


def overlapping_writers(device: Any, seed: int, threads: int = 6, writes: int = 10, longest: int = 9000) -> None:
    """Threads write (and sometimes first zero) random overlapping ranges of ``device``, which must read 0xEE
    everywhere to begin with, some of them aligned to 4 KiB, each filling its ranges with its own number. Writes
    may land in any order, but a byte that any of them covered must hold some writer's number, never 0xEE again
    (which a read-modify-write racing another write would put back). Few enough writes that most bytes are
    written once or twice, so a lost write is not hidden by a later one."""
    import random
    import threading

    size = device.size
    rng = random.Random(seed)
    plans: list[list[tuple[int, int]]] = []
    for _ in range(threads):
        plan = []
        for _ in range(writes):
            offset, length = rng.randrange(size - longest), rng.randrange(1, longest)
            if rng.random() < 0.3:
                offset, length = offset // 4096 * 4096, max(4096, length // 4096 * 4096)
            plan.append((offset, length))
        plans.append(plan)
    writers: list[set[int]] = [set() for _ in range(size)]
    for number, plan in enumerate(plans, 1):
        for offset, length in plan:
            for position in range(offset, offset + length):
                writers[position].add(number)
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        try:
            for offset, length in plans[number - 1]:
                if rng.random() < 0.2:
                    device.write_zeroes(offset, length)  # the same thread's write follows: never the last word
                device.pwrite(bytes([number]) * length, offset)
        except BaseException as exc:
            errors.append(exc)

    running = [threading.Thread(target=writer, args=(number,)) for number in range(1, threads + 1)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(60)
    assert not errors, errors
    final = memoryview(bytearray(size))
    device.pread_into(final, 0)
    for position, value in enumerate(bytes(final)):
        if writers[position]:
            assert value in writers[position], (position, value, writers[position])
        else:
            assert value == 0xEE, (position, value)
