"""Bit arrays over granules: one bit per granule, bit ``i`` in byte ``i >> 3`` at position ``i & 7``.

Plain functions on ``bytearray``, so that the bitmap, its frozen copies and its stores share one layout. Runs
are found a byte at a time with a compiled regular expression (C speed, whatever the array's size), and
counted with ``int.bit_count``. Bits past the last granule in the last byte are always 0.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_EXTENTS",
    "byte_count",
    "granule_count",
    "is_set",
    "all_set",
    "set_range",
    "next_with",
    "count_set",
    "merge_spans",
    "extents_of",
]

MAX_EXTENTS = (1 << 20) // 8
"""The most extents one block status answer of a bitmap carries, as qemu-nbd sends at most (1 MiB of 8-byte
descriptors); an answer that stops there covers less than was asked, as the spec allows."""

_ANY_SET = re.compile(rb"[^\x00]")
_ANY_CLEAR = re.compile(rb"[^\xff]")


def granule_count(size: int, granularity: int) -> int:
    """Granules of ``granularity`` bytes that cover ``size`` bytes (the last one may be partial)."""
    return -(-size // granularity)


def byte_count(granules: int) -> int:
    """Bytes of a bit array of ``granules`` bits."""
    return (granules + 7) >> 3


def is_set(bits: bytearray, index: int) -> bool:
    return bool(bits[index >> 3] >> (index & 7) & 1)


def all_set(bits: bytearray, start: int, end: int) -> bool:
    """Whether every bit in ``[start, end)`` is set."""
    return next_with(bits, start, end, False) >= end


def set_range(bits: bytearray, start: int, end: int) -> None:
    """Set the bits ``[start, end)``."""
    if start >= end:
        return
    first, last = start >> 3, (end - 1) >> 3
    if first == last:
        bits[first] |= ((1 << (end - start)) - 1) << (start & 7)
        return
    bits[first] |= (0xFF << (start & 7)) & 0xFF
    if last > first + 1:
        bits[first + 1 : last] = b"\xff" * (last - first - 1)
    bits[last] |= (1 << (end - (last << 3))) - 1


def next_with(bits: bytearray, start: int, end: int, value: bool) -> int:
    """The first index in ``[start, end)`` whose bit is ``value``; ``end`` when there is none."""
    index = start
    while index < end and index & 7:
        if bool(bits[index >> 3] >> (index & 7) & 1) is value:
            return index
        index += 1
    if index >= end:
        return end
    found = (_ANY_SET if value else _ANY_CLEAR).search(bits, index >> 3, (end + 7) >> 3)
    if found is None:
        return end
    byte = found.start()
    pattern = bits[byte] if value else ~bits[byte] & 0xFF
    return min((byte << 3) + (pattern & -pattern).bit_length() - 1, end)


def count_set(bits: bytearray | bytes, start: int = 0, end: int | None = None) -> int:
    """Set bits in the bytes ``[start, end)`` of ``bits``."""
    return int.from_bytes(bits[start:end], "little").bit_count()


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-open ranges, sorted, with those that overlap or touch merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def extents_of(bits: bytearray, shift: int, size: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The bitmap's block status for ``[offset, offset + length)`` as qemu-nbd answers it: (length, flags) runs,
    flags 1 dirty and 0 clean, alternating, the first starting at ``offset``, the last ending at the range's end
    (cut at ``size``); boundaries inside the range fall on granule boundaries (``1 << shift`` bytes). At most
    MAX_EXTENTS runs, then the answer stops short."""
    end = min(offset + length, size)
    out: list[tuple[int, int]] = []
    if offset >= end:
        return out
    last = ((end - 1) >> shift) + 1
    granule = offset >> shift
    dirty = is_set(bits, granule)
    position = offset
    while position < end and len(out) < MAX_EXTENTS:
        granule = next_with(bits, granule, last, not dirty)
        stop = min(granule << shift, end)
        out.append((stop - position, int(dirty)))
        position, dirty = stop, not dirty
    return out
