"""The streaming ends of a copy (``-``): standard input as the source, standard output as the target, and a
local file written in order from a stream (see ``_copy``).

A stream has no size and no random access. Reading one, the copy takes fixed-size chunks in order (each read
in a worker thread, so the NBD connections go on meanwhile) until end of file, and sends each as writes, the
all-zero parts of it as zero runs (holes stay holes, as nbdcopy's sparse detection keeps them). Writing one,
pieces may complete in any order but are written strictly in order: a piece that is ready early waits (holding
its buffer, so memory stays bounded by the requests in flight) until all before it are written.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from ._copyloop import REQUEST_SIZE, CopyLoop, Done

__all__ = ["StreamTarget", "read_chunk", "read_in_thread", "zero_runs", "SPARSE_GRANULE"]

SPARSE_GRANULE = 64 << 10
"""The unit in which a streamed chunk is checked for zeros: an all-zero granule becomes part of a zero run. A
multiple of any minimum block size, so zero runs stay aligned wherever the chunk is."""
_ZEROES = memoryview(bytes(max(REQUEST_SIZE, SPARSE_GRANULE)))


def read_chunk(fd: int, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``fd`` (a pipe may hand over less at a time); the count, short only at end of file."""
    got = 0
    while got < len(buffer):
        count = os.readv(fd, [buffer[got:]])
        if not count:
            break
        got += count
    return got


def read_in_thread(loop: CopyLoop, fd: int, buffer: memoryview) -> int:
    """``read_chunk`` in a worker thread, the copy's loop going on until it is done."""
    got: list[int] = []
    loop.in_thread(lambda: got.append(read_chunk(fd, buffer)), lambda: None)
    loop.wait(lambda: bool(got))
    return got[0]


def zero_runs(
    data: memoryview, granule: int = SPARSE_GRANULE, owner: bytearray | None = None
) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_zero) runs of ``data``, ``granule`` by ``granule`` from its start, adjacent granules of a
    kind merged. With ``owner``, the bytearray whose first bytes ``data`` views: data with no run of
    ``granule`` zeros anywhere in it is then one data run, found at the speed of a byte search (most data read
    from a disk is like that), not granule by granule."""
    if not len(data):
        return
    zeroes = _ZEROES[:granule] if granule <= len(_ZEROES) else memoryview(bytes(granule))
    if owner is not None and owner.find(zeroes, 0, len(data)) < 0:
        yield 0, len(data), False
        return
    start, zero = 0, False
    for at in range(0, len(data), granule):
        end = min(at + granule, len(data))
        granule_zero = data[at:end] == zeroes[: end - at]
        if at == 0:
            zero = granule_zero
        elif granule_zero != zero:
            yield start, at, zero
            start, zero = at, granule_zero
    yield start, len(data), zero


class StreamTarget:
    """Writes the copy to ``fd`` in order: standard output (``-``), or a local file being written from a stream
    (its zero runs skipped with lseek, so they stay holes, and the file cut to its length at the end)."""

    max_request = 1 << 30  # no limit of its own: the copy's request size decides
    minimum_block_size = 1

    def __init__(self, fd: int, loop: CopyLoop) -> None:
        self.fd = fd
        self.loop = loop
        self.seekable = stat.S_ISREG(os.fstat(fd).st_mode)
        self.size = 1 << 63
        self._next = 0
        self._ready: dict[int, tuple[memoryview | int, Done]] = {}  # offset: (data, or a count of zeros; done)
        self._busy = False

    def write(self, data: memoryview, offset: int, done: Done) -> None:
        self._ready[offset] = (data, done)
        self._pump()

    def zero(self, offset: int, length: int, done: Done) -> None:
        self._ready[offset] = (length, done)
        self._pump()

    def _pump(self) -> None:
        if self._busy or self._next not in self._ready:
            return
        item, done = self._ready.pop(self._next)
        length = item if isinstance(item, int) else len(item)
        self._busy = True

        def finished() -> None:
            self._busy = False
            self._next += length
            done()
            self._pump()

        self.loop.in_thread(lambda: self._put(item), finished)

    def _put(self, item: memoryview | int) -> None:
        if isinstance(item, int):
            if self.seekable:
                os.lseek(self.fd, item, os.SEEK_CUR)
                return
            while item:
                item -= os.write(self.fd, _ZEROES[: min(item, len(_ZEROES))])
            return
        view = item
        while view:
            view = view[os.write(self.fd, view) :]

    def finish(self, flush: bool = False) -> None:
        if self.seekable:
            os.ftruncate(self.fd, self._next)  # a file that ends in a hole still has its length
        if flush and self.seekable:
            os.fdatasync(self.fd)

    def close(self) -> None:
        pass
