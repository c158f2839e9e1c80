"""BlockSizeFilter: let any client use a device with large sectors or a small request limit.

Like nbdkit's blocksize filter. The inner device is given only requests it accepts: aligned to ``minimum``
(by default its own minimum block size, e.g. 4096 for a disk with 4 KiB sectors) and, for reads and writes,
no longer than ``maximum`` (by default its own maximum payload). Clients are told they may use any alignment
(minimum block size 1) and requests up to 32 MiB (or the inner device's maximum, if larger), and the filter
does the rest:

- a longer read or write is split into pieces of at most ``maximum``;
- an unaligned read reads the enclosing blocks and copies out the bytes asked for;
- an unaligned write or write-zeroes reads each partly covered block, changes the bytes in it and writes the
  whole block back (read-modify-write). Such a block is held exclusive while this happens and every other
  write holds its range shared (``RegionLocks``), so concurrent writes to one block never lose each other. A
  fast write-zeroes that would need a read-modify-write fails with ENOTSUP, as the spec asks of a zero that
  cannot be fast;
- an unaligned trim trims only the whole blocks inside it (trim is advisory);
- block status and cache are asked of the enclosing aligned range, and the answer trimmed to the range asked.

The size is rounded down to a multiple of ``minimum`` (an unaligned tail cannot be read or written safely),
as nbdkit's filter does. Aligned reads that fit in ``maximum`` go straight to the inner device, read views
included. Thread-safe; multi-conn safe whenever the inner device is (one filter serves every connection, so
its locks cover them all).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities
from nbdproto.wire import DEFAULT_MAX_PAYLOAD

from ._filter import Filter
from ._ranges import check_range
from ._regions import RegionLocks

__all__ = ["BlockSizeFilter"]


class BlockSizeFilter(Filter):
    """``inner`` offered to clients with any alignment and large requests (see the module docstring)."""

    def __init__(self, inner: BlockDevice, *, minimum: int | None = None, maximum: int | None = None) -> None:
        super().__init__(inner)
        capabilities = inner.capabilities
        inner_minimum = capabilities.minimum_block_size
        if minimum is None:
            minimum = inner_minimum
        if minimum <= 0 or minimum & (minimum - 1) or minimum > 65536:
            raise ValueError(f"minimum block size {minimum} must be a power of two from 1 to 64 KiB")
        if minimum % inner_minimum:
            raise ValueError(f"minimum block size {minimum} is not a multiple of the device's own {inner_minimum}")
        if maximum is None:
            maximum = max(minimum, capabilities.maximum_payload - capabilities.maximum_payload % minimum)
        if maximum < minimum or maximum % minimum or maximum > 0xFFFFFFFF:
            raise ValueError(f"maximum request size {maximum} must be a multiple of the minimum {minimum}")
        self.minimum = minimum
        self.maximum = maximum
        self._mask = minimum - 1
        self._size = inner.size - inner.size % minimum
        self._regions = RegionLocks()
        self._inner_view: Any = getattr(inner, "read_view", None)

    @property
    def size(self) -> int:
        return self._size

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        return replace(
            inner,
            minimum_block_size=1,
            preferred_block_size=max(inner.preferred_block_size, self.minimum),
            maximum_payload=max(DEFAULT_MAX_PAYLOAD, inner.maximum_payload),
            can_resize=False,
        )

    def _aligned(self, offset: int, length: int) -> bool:
        return not (offset | length) & self._mask

    def read_view(self, offset: int, length: int) -> Any:
        """The inner device's own view for an aligned read it accepts whole, else None (then pread_into)."""
        view = self._inner_view
        if view is None or (offset | length) & self._mask or length > self.maximum or offset + length > self._size:
            return None
        return view(offset, length)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        if not (offset | length) & self._mask and length <= self.maximum and 0 <= offset <= self._size - length:
            self.inner.pread_into(buffer, offset)
            return
        check_range(self._size, offset, length)
        minimum, end, pos = self.minimum, offset + length, offset
        while pos < end:
            if pos & self._mask or end - pos < minimum:
                block = pos & ~self._mask
                whole = bytearray(minimum)
                self.inner.pread_into(memoryview(whole), block)
                take = min(end, block + minimum) - pos
                buffer[pos - offset : pos - offset + take] = whole[pos - block : pos - block + take]
            else:
                take = min((end - pos) & ~self._mask, self.maximum)
                self.inner.pread_into(buffer[pos - offset : pos - offset + take], pos)
            pos += take

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        length = view.nbytes
        check_range(self._size, offset, length, writing=True)
        if not length:
            return
        end = offset + length
        if self._aligned(offset, length):
            with self._regions.shared(offset, end):
                self._write_aligned(view, offset, fua)
            return
        with self._regions.exclusive(offset & ~self._mask, (end + self._mask) & ~self._mask):
            self._patch(offset, end, view, fua)

    def _write_aligned(self, view: memoryview, offset: int, fua: bool) -> None:
        done, length, maximum = 0, view.nbytes, self.maximum
        while done < length:
            take = min(length - done, maximum)
            self.inner.pwrite(view[done : done + take], offset + done, fua)
            done += take

    def _patch(self, offset: int, end: int, view: memoryview | None, fua: bool) -> None:
        """Write ``view`` (zeroes when None) over [offset, end): read-modify-write of the partly covered blocks,
        the aligned middle as is. The caller holds the enclosing blocks exclusive."""
        minimum, mask, pos = self.minimum, self._mask, offset
        while pos < end:
            if pos & mask or end - pos < minimum:
                block = pos & ~mask
                take = min(end, block + minimum) - pos
                whole = bytearray(minimum)
                self.inner.pread_into(memoryview(whole), block)
                if view is None:
                    whole[pos - block : pos - block + take] = bytes(take)
                else:
                    whole[pos - block : pos - block + take] = view[pos - offset : pos - offset + take]
                self.inner.pwrite(whole, block, fua)
            else:
                take = (end - pos) & ~mask
                if view is None:
                    self.inner.write_zeroes(pos, take, fua=fua)
                else:
                    self._write_aligned(view[pos - offset : pos - offset + take], pos, fua)
            pos += take

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        check_range(self._size, offset, length, writing=True)
        if not length:
            return
        end = offset + length
        if self._aligned(offset, length):
            with self._regions.shared(offset, end):
                self.inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
            return
        if fast:
            raise OSError(errno.ENOTSUP, f"zeroing a part of a {self.minimum}-byte block needs a read-modify-write")
        with self._regions.exclusive(offset & ~self._mask, (end + self._mask) & ~self._mask):
            self._patch(offset, end, None, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        check_range(self._size, offset, length, writing=True)
        start, stop = (offset + self._mask) & ~self._mask, (offset + length) & ~self._mask
        if start < stop:
            self.inner.trim(start, stop - start, fua)

    def cache(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        start, stop = offset & ~self._mask, (offset + length + self._mask) & ~self._mask
        if start < stop:
            self.inner.cache(start, stop - start)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        check_range(self._size, offset, length)
        end = offset + length
        if self._aligned(offset, length):
            return self.inner.extents(context, offset, length)
        out: list[tuple[int, int]] = []
        pos = offset & ~self._mask
        while not out:
            stop = (end + self._mask) & ~self._mask
            runs = self.inner.extents(context, pos, stop - pos)
            for run_length, flags in runs:
                run_start, pos = pos, pos + int(run_length)
                first, last = max(run_start, offset), min(pos, end)
                if last > first:
                    out.append((last - first, int(flags)))
                if pos >= end:
                    break
            if not runs or int(runs[0][0]) <= 0:
                raise OSError(errno.EIO, "the device reported no extents")
        return out
