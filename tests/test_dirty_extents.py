"""nbdproto.client.dirty_extents against a byte-by-byte model: a dirty bitmap's block status joined with
base:allocation's, however the two answers cut the range and wherever each stops short."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdproto.client import DirtyExtent, dirty_extents

runs = st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=12)


def per_byte(offset: int, extents: list[tuple[int, int]]) -> dict[int, int]:
    out, position = {}, offset
    for length, flags in extents:
        for byte in range(position, position + length):
            out[byte] = flags
        position += length
    return out


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, 1000), dirty=runs, allocation=st.one_of(st.none(), runs))
def test_joined_extents_say_what_each_byte_is_up_to_where_both_answers_reach(
    offset: int, dirty: list[tuple[int, int]], allocation: list[tuple[int, int]] | None
) -> None:
    joined = dirty_extents(offset, dirty, allocation)
    bitmap = per_byte(offset, dirty)
    zeroes = per_byte(offset, allocation) if allocation is not None else None
    reach = len(bitmap) if zeroes is None else min(len(bitmap), len(zeroes))
    position = offset
    for extent in joined:
        assert extent.offset == position and extent.length > 0
        for byte in range(extent.offset, extent.offset + extent.length):
            assert extent.dirty == bool(bitmap[byte] & 1)
            assert extent.zero == (zeroes is not None and bool(zeroes[byte] & 2))
        position += extent.length
    assert position == offset + reach
    for first, second in itertools.pairwise(joined):
        assert (first.dirty, first.zero) != (second.dirty, second.zero)  # neighbours alike are merged


def test_an_empty_answer_gives_nothing() -> None:
    assert dirty_extents(0, [], [(10, 0)]) == []
    assert dirty_extents(0, [(10, 1)], []) == []
    assert dirty_extents(5, [(10, 1)]) == [DirtyExtent(5, 10, True, False)]
