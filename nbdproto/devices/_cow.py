"""CowFilter: a writable copy-on-write overlay over a base device that is never changed.

Like nbdkit's cow filter and ``qemu-nbd --snapshot``: writes, trims and write-zeroes go to an overlay; reads of
blocks never written come from the base. The base is only ever read (open it read-only: the filter never
calls its write methods), so a disk image can be served writable while it stays as it was, and everything
written is thrown away with the overlay. The overlay is a sparse ``MemoryDevice`` by default, or a new sparse
file at ``overlay`` (for overlays bigger than memory; the file is left in place at close, holding the
written blocks at their own offsets).

The overlay works in blocks of ``block_size`` bytes (64 KiB by default, a power of two; a partial last block
where the size is not a multiple). A block is either the base's or the overlay's, and once it is the
overlay's it stays so. The first write to a block that covers only part of it copies the block up first
(reads it from the base, writes it to the overlay) and then writes into the overlay. A copy-up must not
interleave with another write to the same block (it would put back the base's bytes over the other write), so
it holds the block exclusive, and writes to blocks not yet copied hold their range shared (``RegionLocks``);
writes to blocks already in the overlay need no lock at all. A block counts as the overlay's only once its data
is there, so a concurrent read sees either the old or the new bytes, as NBD allows.

Which blocks are the overlay's is a bitmap (``BlockMap``: a bit per block, 2 MiB for a 1 TiB disk of 64 KiB
blocks, pages of it made only where blocks are written), so trimming a whole large disk stays cheap.

Trim is carried out as write-zeroes (the range then reads as zero, not as the base). Block status merges the
two sides: the overlay's runs for its blocks (zeroed blocks are holes), the base's for the rest (all data
where the base cannot tell). What the filter can do does not depend on the base: it writes, trims, zeroes
(fast), flushes and honours FUA (on a file overlay, fdatasync) over a base that can do none of these. One
overlay serves every connection, so it is multi-conn safe.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from nbdproto.files import DATA_MODE, writable_file
from nbdproto.serving import BlockDevice, Buffer, DeviceCapabilities, dispatch_of
from nbdproto.wire import BASE_ALLOCATION

from ._blockmap import BlockMap
from ._filter import Filter, slower_dispatch
from ._ranges import check_range
from ._regions import RegionLocks

__all__ = ["CowFilter"]

_MAX_EXTENTS = 1024


def _overlay_file(path: str | os.PathLike[str], size: int) -> BlockDevice:
    """A new sparse file of ``size`` bytes at ``path``, mode 0600, created as nbdproto.files creates every file
    (no symlink followed; an existing file must be ours and writable by no other user, or another user could
    read what clients write). An existing file must also be empty, so that a disk image named by mistake is
    never overwritten."""
    from ._file import FileDevice

    fd = writable_file(path, DATA_MODE, read=True, truncate=False)
    try:
        if os.fstat(fd).st_size:
            raise OSError(errno.EEXIST, "the overlay file exists and is not empty", os.fspath(path))
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return FileDevice.from_descriptor(fd, path)


class CowFilter(Filter):
    """A copy-on-write overlay over ``base`` (see the module docstring). ``overlay``: None for memory, or the
    path of a new (or empty) file."""

    def __init__(
        self, base: BlockDevice, *, overlay: str | os.PathLike[str] | None = None, block_size: int = 64 * 1024
    ) -> None:
        super().__init__(base)
        minimum = base.capabilities.minimum_block_size
        if block_size <= 0 or block_size & (block_size - 1) or block_size % minimum or block_size > 1 << 25:
            raise ValueError(
                f"cow block size {block_size} must be a power of two up to 32 MiB and a multiple of the base's "
                f"minimum block size {minimum}"
            )
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self._size = base.size
        if overlay is None:
            from ._memory import MemoryDevice

            self.overlay: BlockDevice = MemoryDevice(self._size)
        else:
            self.overlay = _overlay_file(overlay, self._size)
        self._written = BlockMap()  # blocks whose data is in the overlay
        self._regions = RegionLocks()
        self._zero_block = bytes(block_size)
        self.dispatch = slower_dispatch(dispatch_of(base), dispatch_of(self.overlay))

    @property
    def size(self) -> int:
        return self._size

    @property
    def written_blocks(self) -> int:
        """How many blocks the overlay holds."""
        return self._written.count()

    def _capabilities_over(self, inner: DeviceCapabilities) -> DeviceCapabilities:
        return replace(
            inner, can_write=True, can_flush=True, can_fua=True, can_trim=True, can_zero=True, can_fast_zero=True,
            can_multi_conn=True, can_resize=False, meta_contexts=(BASE_ALLOCATION,),
        )  # fmt: skip

    def _runs(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, stop, in the overlay) for the runs of [offset, end) that lie on one side."""
        shift, written = self._shift, self._written
        last = ((end - 1) >> shift) + 1
        pos = offset
        while pos < end:
            block = pos >> shift
            stop = min(written.run_end(block, last) << shift, end)
            yield pos, stop, block in written
            pos = stop

    def _all_written(self, offset: int, end: int) -> bool:
        return self._written.all_in(offset >> self._shift, ((end - 1) >> self._shift) + 1)

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        length = len(buffer)
        check_range(self._size, offset, length)
        if not self._written:
            self.inner.pread_into(buffer, offset)
            return
        for start, stop, side in self._runs(offset, offset + length):
            (self.overlay if side else self.inner).pread_into(buffer[start - offset : stop - offset], start)

    def read_view(self, offset: int, length: int) -> Any:
        """The base's own read view where no block of the range was written (else None: use pread_into)."""
        view = getattr(self.inner, "read_view", None)
        if view is None or length <= 0 or offset < 0 or offset + length > self._size:
            return None
        if self._written and any(side for _, _, side in self._runs(offset, offset + length)):
            return None
        return view(offset, length)

    def _copy_up_edges(self, offset: int, end: int) -> None:
        """Copy up the blocks that [offset, end) covers only partly and that the overlay does not hold yet."""
        shift = self._shift
        first, last = offset >> shift, (end - 1) >> shift
        partial_head = offset != first << shift
        partial_tail = end != min((last + 1) << shift, self._size)
        if first == last:
            edges = [first] if partial_head or partial_tail else []
        else:
            edges = [first] * partial_head + [last] * partial_tail
        for block in edges:
            if block not in self._written:
                self._copy_up(block)

    def _copy_up(self, block: int) -> None:
        start = block << self._shift
        stop = min(start + self.block_size, self._size)
        with self._regions.exclusive(start, stop):
            if block in self._written:
                return  # another writer copied it up while we waited
            data = bytearray(stop - start)
            self.inner.pread_into(memoryview(data), start)
            if data != self._zero_block[: stop - start]:  # the overlay reads zero already
                self.overlay.pwrite(data, start)
            self._written.add(block)

    def _write_overlay(self, offset: int, end: int, write: Callable[[], None]) -> None:
        """Carry out ``write`` on the overlay's [offset, end) and make the range the overlay's."""
        if self._all_written(offset, end):
            write()
            return
        # Shared: a copy-up of a block in the range (exclusive) would otherwise put the base's bytes back over
        # this write.
        with self._regions.shared(offset, end):
            write()
            self._written.add_range(offset >> self._shift, ((end - 1) >> self._shift) + 1)

    def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        view = data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
        length = view.nbytes
        check_range(self._size, offset, length, writing=True)
        if not length:
            return
        end = offset + length
        self._copy_up_edges(offset, end)
        self._write_overlay(offset, end, lambda: self.overlay.pwrite(view, offset, fua))

    def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        check_range(self._size, offset, length, writing=True)
        if not length:
            return
        end = offset + length
        self._copy_up_edges(offset, end)
        zero = self.overlay.write_zeroes
        self._write_overlay(offset, end, lambda: zero(offset, length, may_trim=may_trim, fast=fast, fua=fua))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.write_zeroes(offset, length, may_trim=True, fua=fua)

    def flush(self) -> None:
        self.overlay.flush()

    def cache(self, offset: int, length: int) -> None:
        check_range(self._size, offset, length)
        if not self.inner.capabilities.can_cache:
            return
        for start, stop, side in self._runs(offset, offset + length):
            if not side:
                self.inner.cache(start, stop - start)

    def extents(self, context: str, offset: int, length: int) -> Sequence[tuple[int, int]]:
        check_range(self._size, offset, length)
        if context != BASE_ALLOCATION:
            return [(length, 0)]
        base_knows = BASE_ALLOCATION in self.inner.capabilities.meta_contexts
        out: list[tuple[int, int]] = []
        for start, stop, side in self._runs(offset, offset + length):
            pos = start
            while pos < stop and len(out) < _MAX_EXTENTS:
                if side:
                    runs = self.overlay.extents(BASE_ALLOCATION, pos, stop - pos)
                elif base_knows:
                    runs = self.inner.extents(BASE_ALLOCATION, pos, stop - pos)
                else:
                    runs = [(stop - pos, 0)]
                before = pos
                for run_length, flags in runs:
                    run_length = min(int(run_length), stop - pos)
                    if run_length <= 0:
                        break
                    if out and out[-1][1] == int(flags):
                        out[-1] = (out[-1][0] + run_length, out[-1][1])
                    else:
                        out.append((run_length, int(flags)))
                    pos += run_length
                if pos == before:  # a side that reports nothing: call the rest data rather than loop
                    out.append((stop - pos, 0))
                    pos = stop
            if len(out) >= _MAX_EXTENTS:
                break
        return out

    def resize(self, size: int) -> None:
        raise OSError(errno.ENOTSUP, "a cow overlay cannot be resized (its base must not change)")

    def close(self) -> None:
        try:
            self.overlay.close()
        finally:
            self.inner.close()
