"""What changed, from block status: a dirty bitmap's extents joined with ``base:allocation``'s, without I/O.

An incremental backup copies only the regions a dirty bitmap (the meta context ``qemu:dirty-bitmap:NAME``,
qemu's docs/interop/nbd.rst: flag 1 dirty) reports, and of those it writes the ones ``base:allocation`` says
read as zero as zeroes or holes, never as data. One block status request asks for both contexts; its two
descriptor lists cut the range at different places, and each may stop short of the range. ``dirty_extents``
walks both at once and says, for each piece, whether it is dirty and whether it reads as zero, up to where
both answers reach; ``ClientRequests.dirty_extents`` (both clients) and ``nbdproto copy --only-dirty`` use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from nbdproto.engine import Extent
from nbdproto.wire import AllocationState

__all__ = ["DirtyExtent", "DIRTY_BITMAP_PREFIX", "dirty_extents"]

DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
_DIRTY = 1
_ZERO = int(AllocationState.ZERO)


class DirtyExtent(NamedTuple):
    """``length`` bytes from ``offset``: ``dirty`` as the bitmap says; ``zero`` when base:allocation says they
    read as zero (False where it was not asked)."""

    offset: int
    length: int
    dirty: bool
    zero: bool


def _runs(offset: int, extents: Iterable[Extent | tuple[int, int]]) -> list[tuple[int, int, int]]:
    out, position = [], offset
    for length, status in extents:
        if length > 0:
            out.append((position, position + length, int(status)))
            position += length
    return out


def dirty_extents(
    offset: int,
    dirty: Sequence[Extent | tuple[int, int]],
    allocation: Sequence[Extent | tuple[int, int]] | None = None,
) -> list[DirtyExtent]:
    """The pieces of the range from ``offset`` that both answers cover (``dirty``: the bitmap's extents,
    ``allocation``: base:allocation's, or None), each with its dirty and zero flags; neighbours alike are
    merged. Empty when either answer is."""
    bitmap = _runs(offset, dirty)
    zeroes = _runs(offset, allocation) if allocation is not None else None
    if not bitmap or zeroes == []:
        return []
    end = bitmap[-1][1] if zeroes is None else min(bitmap[-1][1], zeroes[-1][1])
    cuts = sorted({start for start, _, _ in bitmap} | {start for start, _, _ in zeroes or []} | {end})
    out: list[DirtyExtent] = []
    b = z = 0
    for start, stop in itertools.pairwise(cuts):
        if start >= end:
            break
        while bitmap[b][1] <= start:
            b += 1
        is_dirty = bool(bitmap[b][2] & _DIRTY)
        is_zero = False
        if zeroes is not None:
            while zeroes[z][1] <= start:
                z += 1
            is_zero = bool(zeroes[z][2] & _ZERO)
        if out and out[-1].dirty == is_dirty and out[-1].zero == is_zero:
            last = out[-1]
            out[-1] = last._replace(length=last.length + stop - start)
        else:
            out.append(DirtyExtent(start, stop - start, is_dirty, is_zero))
    return out
