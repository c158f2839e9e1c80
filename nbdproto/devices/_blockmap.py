"""BlockMap: which blocks of a device are set, as one bit per block, for the cow overlay's "this block is mine".

A set of block numbers would cost some 60 bytes per block: a client that trims a whole 1 TiB disk through a
cow overlay of 64 KiB blocks would make it 16 million entries, about a gigabyte. A bit per block costs 2 MiB
for that disk, and bits live in 4 KiB pages (32768 blocks each) made only when a block in them is first set,
so an exabyte device with a few blocks written costs a few pages.

Reads take no lock: testing a bit reads one byte. Setting bits is a read-modify-write of a byte, which two
threads setting neighbouring bits would race on (losing one of them), so it happens under a lock; it happens
once per block.
"""

from __future__ import annotations

import threading

__all__ = ["BlockMap"]

_PAGE_BYTES = 4096
_PAGE_BITS = _PAGE_BYTES * 8


class BlockMap:
    """A growing set of block numbers, a bit each (see the module docstring); blocks are never removed."""

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def __contains__(self, block: int) -> bool:
        page = self._pages.get(block // _PAGE_BITS)
        return page is not None and bool(page[(block % _PAGE_BITS) >> 3] >> (block & 7) & 1)

    def __bool__(self) -> bool:
        return bool(self._pages)

    def count(self) -> int:
        """How many blocks are set."""
        return sum(int.from_bytes(page, "little").bit_count() for page in list(self._pages.values()))

    def add(self, block: int) -> None:
        self.add_range(block, block + 1)

    def add_range(self, start: int, stop: int) -> None:
        """Set the blocks [start, stop)."""
        with self._lock:
            while start < stop:
                index = start // _PAGE_BITS
                page = self._pages.get(index)
                if page is None:
                    page = self._pages[index] = bytearray(_PAGE_BYTES)
                first, end = start % _PAGE_BITS, min(stop - index * _PAGE_BITS, _PAGE_BITS)
                full_from, full_to = (first + 7) >> 3, end >> 3
                if full_from < full_to:
                    page[full_from:full_to] = b"\xff" * (full_to - full_from)
                    for bit in (*range(first, full_from << 3), *range(full_to << 3, end)):
                        page[bit >> 3] |= 1 << (bit & 7)
                else:
                    for bit in range(first, end):
                        page[bit >> 3] |= 1 << (bit & 7)
                start = index * _PAGE_BITS + end

    def run_end(self, block: int, limit: int) -> int:
        """The first block after ``block`` and before ``limit`` that is set where ``block`` is not or the other
        way round; ``limit`` if there is none. Whole bytes and missing pages are skipped at C speed."""
        side = block in self
        pos = block + 1
        while pos < limit:
            index = pos // _PAGE_BITS
            page = self._pages.get(index)
            page_end = min((index + 1) * _PAGE_BITS, limit)
            if page is None:
                if side:
                    return pos
                pos = page_end
                continue
            base = index * _PAGE_BITS
            while pos < page_end:
                if not pos & 7:  # at a byte boundary: skip the bytes that are all ``side``
                    offset = (pos - base) >> 3
                    rest = page[offset:]
                    pos = min(pos + 8 * (len(rest) - len(rest.lstrip(b"\xff" if side else b"\x00"))), page_end)
                    if pos >= page_end:
                        break
                if bool(page[(pos - base) >> 3] >> (pos & 7) & 1) != side:
                    return pos
                pos += 1
        return limit

    def all_in(self, start: int, stop: int) -> bool:
        """True when every block of [start, stop) is set."""
        return start in self and self.run_end(start, stop) == stop
