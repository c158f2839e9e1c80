"""What MirrorDevice asks of each side: the primary's runs of data and holes, and one side's share of a
client's write, trim or zero (what that device can do, the rest emulated as the meaning allows)."""

from __future__ import annotations

import errno

from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities
from nbdproto.wire import BASE_ALLOCATION, AllocationState

from ._emulation import flush_for_fua, native_fua, zero_by_writing

__all__ = ["runs_of", "write_side", "trim_side", "zero_side"]

_READS_AS_ZERO = int(AllocationState.ZERO)


def runs_of(device: BlockDevice, offset: int, length: int, *, stop_short: bool) -> list[tuple[int, int, bool]]:
    """(offset, length, is_zero) runs of ``device`` from ``offset``: all of ``length``, or with ``stop_short``
    as far as one answer went."""
    out: list[tuple[int, int, bool]] = []
    end = offset + length
    position = offset
    while position < end:
        answer = device.extents(BASE_ALLOCATION, position, end - position)
        if not answer:
            raise OSError(errno.EIO, f"block status answered nothing at {position}")
        for run_length, flags in answer:
            size = min(int(run_length), end - position)
            if size <= 0:
                raise OSError(errno.EIO, f"block status answered an empty run at {position}")
            zero = bool(int(flags) & _READS_AS_ZERO)
            if out and out[-1][2] == zero:
                last = out[-1]
                out[-1] = (last[0], last[1] + size, zero)
            else:
                out.append((position, size, zero))
            position += size
            if position >= end:
                break
        if stop_short:
            break
    return out


def write_side(device: BlockDevice, caps: DeviceCapabilities, data: Buffer, offset: int, fua: bool) -> None:
    device.pwrite(data, offset, native_fua(caps, fua))
    flush_for_fua(caps, fua, device.flush)


def trim_side(device: BlockDevice, caps: DeviceCapabilities, offset: int, length: int, fua: bool) -> None:
    if caps.can_trim:
        device.trim(offset, length, native_fua(caps, fua))
    elif caps.can_zero:  # the sides must read alike: where one drops the data, the other zeroes it
        device.write_zeroes(offset, length, may_trim=True, fua=native_fua(caps, fua))
    else:
        return  # a trim is advisory: a side that cannot drop the data keeps it
    flush_for_fua(caps, fua, device.flush)


def zero_side(
    device: BlockDevice,
    caps: DeviceCapabilities,
    offset: int,
    length: int,
    may_trim: bool = True,
    fast: bool = False,
    fua: bool = False,
) -> None:
    """Zero a range of one side. A fast zero that the primary managed is tried fast here too, then slowly:
    the two sides must agree even if this one is slower than it said."""
    if caps.can_zero:
        native = native_fua(caps, fua)
        try:
            device.write_zeroes(offset, length, may_trim=may_trim, fast=fast and caps.can_fast_zero, fua=native)
        except OSError as exc:
            if not fast or exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            device.write_zeroes(offset, length, may_trim=may_trim, fua=native)
    else:
        zero_by_writing(device.pwrite, offset, length, caps.maximum_payload)
    flush_for_fua(caps, fua, device.flush)
