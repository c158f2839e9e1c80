"""MemoryDevice: a sparse in-memory block device.

Memory grows with the data written, not with the size: the device is a dict of 64 KiB pages, and a page that
was never written (or was trimmed or zeroed whole) does not exist, reads as zero, and is reported as a hole
by block status. A 1 TiB device with nothing written costs a few hundred bytes.

Safe from many threads at once: a page is created with ``dict.setdefault`` (atomic under the GIL, so two
writers cannot each create their own copy of one page and lose a write), and bytearray slice assignment is
atomic too. Concurrent overlapping writes land in some order, which the NBD spec allows.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from nbdproto.serving import Buffer, DeviceCapabilities, Dispatch
from nbdproto.wire import BASE_ALLOCATION

from ._ranges import HOLE, check_range

__all__ = ["MemoryDevice", "PAGE_SIZE"]

PAGE_SIZE = 64 * 1024
_ZEROES = memoryview(bytes(PAGE_SIZE))
_MAX_EXTENTS = 1024  # block status answers at most this many runs per call; clients ask again for the rest


class MemoryDevice:
    """A sparse in-memory device of ``size`` bytes; writable unless ``read_only``."""

    dispatch: Dispatch = "inline"
    """Memory copies that never block: servers call it right where the request was read."""

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError(f"size {size} is negative")
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self._capabilities = DeviceCapabilities(
            can_write=not read_only,
            can_trim=True,
            can_zero=True,
            can_fast_zero=True,
            can_cache=True,
            can_multi_conn=True,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._capabilities

    @property
    def allocated(self) -> int:
        """Bytes of memory held by pages (what the device really costs)."""
        return len(self._pages) * PAGE_SIZE

    def _check(self, offset: int, length: int, writing: bool = False) -> None:
        check_range(self._size, offset, length, writing=writing, can_write=self._capabilities.can_write)

    @staticmethod
    def _spans(offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        # (page index, start within page, end within page, position within the request)
        done = 0
        while done < length:
            index, start = divmod(offset + done, PAGE_SIZE)
            end = min(PAGE_SIZE, start + length - done)
            yield index, start, end, done
            done += end - start

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self._check(offset, len(buffer))
        pages = self._pages
        for index, start, end, pos in self._spans(offset, len(buffer)):
            page = pages.get(index)
            size = end - start
            buffer[pos : pos + size] = memoryview(page)[start:end] if page is not None else _ZEROES[:size]

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), writing=True)
        pages = self._pages
        for index, start, end, pos in self._spans(offset, len(view)):
            page = pages.get(index)
            if page is None:
                page = pages.setdefault(index, bytearray(PAGE_SIZE))
            page[start:end] = view[pos : pos + end - start]

    def flush(self) -> None:
        """Nothing to do: memory is as durable as this device gets."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, writing=True)
        pages = self._pages
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        spans = self._spans(offset, length)
        if not may_trim:
            # NO_HOLE: the range must stay (or become) allocated, zeroed in place.
            for index, start, end, _ in spans:
                page = pages.get(index)
                if page is None:
                    pages.setdefault(index, bytearray(PAGE_SIZE))
                else:
                    page[start:end] = _ZEROES[: end - start]
            return
        if last - first > len(pages):
            # Fewer pages exist than the range spans (zeroing most of a big, sparse disk): visit only those.
            present = sorted(index for index in list(pages) if first <= index <= last)
            spans = (
                (index, max(offset - index * PAGE_SIZE, 0), min(offset + length - index * PAGE_SIZE, PAGE_SIZE), 0)
                for index in present
            )
        for index, start, end, _ in spans:
            if start == 0 and end == PAGE_SIZE:
                pages.pop(index, None)  # a whole page: drop it, it reads as zero
            else:
                page = pages.get(index)
                if page is not None:
                    page[start:end] = _ZEROES[: end - start]

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        self._check(offset, length)
        if context != BASE_ALLOCATION:
            return [(length, 0)]
        present = sorted(self._pages)
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        i = bisect_left(present, pos // PAGE_SIZE)
        while pos < end and len(out) < _MAX_EXTENTS:
            index = pos // PAGE_SIZE
            if i < len(present) and present[i] == index:
                # Allocated pages in a row: data.
                j = i
                while j + 1 < len(present) and present[j + 1] == present[j] + 1:
                    j += 1
                run_end = (present[j] + 1) * PAGE_SIZE
                status = 0
                i = j + 1
            else:
                run_end = present[i] * PAGE_SIZE if i < len(present) else self._size
                status = HOLE
            run_end = min(run_end, end)
            _append(out, run_end - pos, status)
            pos = run_end
        return out

    def close(self) -> None:
        self._pages = {}


def _append(out: list[tuple[int, int]], length: int, status: int) -> None:
    if out and out[-1][1] == status:
        out[-1] = (out[-1][0] + length, status)
    else:
        out.append((length, status))
