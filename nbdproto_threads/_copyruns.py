"""Which requests a copy makes: the source's data and zero runs, aligned to both ends' minimum block sizes and
cut to request sizes; and the error for a tail no aligned request can reach (see ``_copy``'s docstring)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nbdproto.wire import STATUS_SPAN

__all__ = ["Runs", "UnreachableTail", "aligned_runs", "pieces"]

Runs = Callable[[int, int], Iterator[tuple[int, int, bool]]]
"""A source's ``runs(offset, length)``: (offset, length, is_zero) runs covering the range, in order."""


class UnreachableTail(Exception):
    """The disk's size is not a multiple of the minimum block size, and the server refused the unaligned
    requests that alone reach its last ``length`` bytes (the ``__cause__`` says how). Raised before anything
    else is copied, as the cause of CopyFailed."""

    def __init__(self, length: int, offset: int, block: int) -> None:
        super().__init__(
            f"the last {length} bytes (from offset {offset}) cannot be copied: the size is not a multiple of the "
            f"minimum block size {block}, and the server refused unaligned requests for them"
        )
        self.length = length
        self.offset = offset

    def __str__(self) -> str:
        return f"{super().__str__()}: {self.__cause__}" if self.__cause__ is not None else super().__str__()


def aligned_runs(runs: Runs, size: int, block: int) -> Iterator[tuple[int, int, bool]]:
    """The data and zero runs over the first ``size`` bytes (a multiple of ``block``) as (start, end,
    is_zero), adjacent runs of a kind merged and every boundary a multiple of ``block``: a zero run keeps the
    whole blocks it covers, and the partial blocks at its edges are copied as data."""
    start, end, zero = 0, 0, False
    for offset, length, is_zero in runs(0, size):
        parts = [(offset, offset + length, is_zero)]
        if is_zero and block > 1:
            first, last = -(-offset // block) * block, (offset + length) // block * block
            if first >= last:
                parts = [(offset, offset + length, False)]
            else:
                parts = [(offset, first, False), (first, last, True), (last, offset + length, False)]
        for piece_start, piece_end, piece_zero in parts:
            if piece_start == piece_end:
                continue
            if piece_zero == zero and piece_start == end:
                end = piece_end
                continue
            if end > start:
                yield start, end, zero
            start, end, zero = piece_start, piece_end, piece_zero
    if end > start:
        yield start, end, zero


def pieces(runs: Runs, size: int, step: int, block: int = 1) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) requests for the runs, aligned to ``block`` (see aligned_runs), data cut to at
    most ``step`` bytes and zero runs to at most STATUS_SPAN (what a compact WRITE_ZEROES can say)."""
    for start, end, zero in aligned_runs(runs, size, block):
        for at in range(start, end, STATUS_SPAN if zero else step):
            yield at, min(STATUS_SPAN if zero else step, end - at), zero
