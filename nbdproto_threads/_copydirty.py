"""``copy --only-dirty NAME``: copy only what a dirty bitmap says changed, onto the previous backup.

The source (an NBD export: a checkpoint's view ``EXPORT@NAME2`` of nbdproto, or qemu-nbd ``-B NAME``) is asked
for ``qemu:dirty-bitmap:NAME`` together with ``base:allocation`` (``nbdproto.client.dirty_extents`` joins the
two). Before anything is copied the whole bitmap is walked once, so that the copy knows its total (the dirty
bytes) for its progress; then only the dirty runs are copied, each as data, or as zeroes or holes where the
source says they read as zero (never as data): the destination, an existing image holding the backup the
bitmap started at, then equals the source. Clean runs are not read, not written, and not counted: the copy's
``copied`` and ``data`` counters say what was transferred.

A dirty run is widened to the copy's alignment (the larger minimum block size of the two ends), taking in at
most a block of clean bytes at each edge: they hold the same bytes on both sides, so copying them changes
nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import nbdproto
from nbdproto import NBDError
from nbdproto.client import DIRTY_BITMAP_PREFIX, DirtyExtent, dirty_extents
from nbdproto.wire import STATUS_SPAN

from ._copyends import NbdEnd
from ._copyloop import Done

__all__ = ["DirtySource"]


class DirtySource:
    """An NbdEnd source (opened with the bitmap's context) seen through bitmap ``bitmap``: ``runs`` gives only
    the dirty runs (module docstring), ``total`` their bytes. ValueError when the source does not offer the
    bitmap."""

    def __init__(self, source: NbdEnd, bitmap: str, block: int = 1) -> None:
        self.source = source
        self.context_name = DIRTY_BITMAP_PREFIX + bitmap
        names = source.connections[0].engine.meta_contexts
        found = [i for i, name in names.items() if name == self.context_name]
        if not found:
            raise ValueError(f"{source.uri} does not offer {self.context_name} (is the bitmap there?)")
        self._names = dict(names)
        self.size = source.size
        self.max_request = source.max_request
        self.minimum_block_size = source.minimum_block_size
        self._runs = list(self._dirty_runs(max(block, 1)))
        self.total = sum(length for _, length, _ in self._runs)

    def _status(self, offset: int, length: int) -> list[DirtyExtent]:
        answer: list[Any] = []
        connection = self.source.connections[0]
        connection.request(lambda c: nbdproto.BlockStatusRequest(c, offset, length), answer.append)
        self.source.loop.wait(lambda: bool(answer))
        (reply,) = answer
        if isinstance(reply, nbdproto.ErrorReply):
            raise NBDError(int(reply.error), reply.message or os.strerror(int(reply.error)))
        by_name = {self._names[i]: extents for i, extents in reply.extents.items()}
        return dirty_extents(offset, by_name[self.context_name], by_name.get(nbdproto.BASE_ALLOCATION))

    def _dirty_runs(self, block: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) of every dirty run before the disk's unaligned tail (which the copy takes
        whole, first), widened to ``block`` (module docstring), in order."""
        size = self.size
        aligned = size - size % block
        out: list[list[Any]] = []  # [start, end, is_zero]
        offset = 0
        while offset < aligned:
            pieces = self._status(offset, min(aligned - offset, STATUS_SPAN))
            if not pieces:
                raise NBDError(5, f"{self.source.uri} answered block status of {offset} with no extents")
            for piece in pieces:
                if piece.dirty:
                    _add(out, piece.offset, min(piece.offset + piece.length, aligned), piece.zero, block)
            offset = pieces[-1].offset + pieces[-1].length
        return [(start, end - start, zero) for start, end, zero in out]

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """The dirty runs within ``[offset, offset + length)`` (the copy asks for the whole disk at once)."""
        end = offset + length
        for start, size, zero in self._runs:
            stop = min(start + size, end)
            start = max(start, offset)
            if start < stop:
                yield start, stop - start, zero

    def read(self, buffer: memoryview, offset: int, done: Done) -> None:
        self.source.read(buffer, offset, done)

    def close(self) -> None:
        self.source.close()


def _add(out: list[list[Any]], start: int, end: int, zero: bool, block: int) -> None:
    """Add the dirty run ``[start, end)`` to ``out``, widened to ``block`` with the clean bytes around it (as
    data), the part that earlier runs cover already left out, a neighbour of the same kind merged."""
    wide_start, wide_end = start - start % block, -(-end // block) * block
    for piece_start, piece_end, piece_zero in ((wide_start, start, False), (start, end, zero), (end, wide_end, False)):
        if out and piece_start < out[-1][1]:
            piece_start = out[-1][1]
        if piece_start >= piece_end:
            continue
        if out and out[-1][1] == piece_start and out[-1][2] == piece_zero:
            out[-1][1] = piece_end
        else:
            out.append([piece_start, piece_end, piece_zero])
