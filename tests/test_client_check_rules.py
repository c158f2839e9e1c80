"""The client's checks of what a server states (nbdproto.engine._client_checks), called directly: each rule at
its edges, and the exact words of each refusal (a RemoteProtocolError names the value and the rule; a message
that lost either is a defect). tests/test_client_checks.py drives the same checks through a ClientConnection.
"""

from __future__ import annotations

import struct

import pytest

from nbdproto.engine._client_checks import (
    EXTENTS_KEPT,
    MAX_MINIMUM_BLOCK_SIZE,
    NO_PAYLOAD_LIMIT,
    ReadCoverage,
    check_block_sizes,
    check_context_name,
    check_export_size,
    descriptor_count,
    parse_block_status,
)
from nbdproto.wire import ChunkType, RemoteProtocolError

MIB = 1 << 20
SIZES = "(spec: Size constraints)"


def refused(call: object, *args: object, **kw: object) -> str:
    with pytest.raises(RemoteProtocolError) as failure:
        call(*args, **kw)  # type: ignore[operator]
    return str(failure.value)


# --- Block sizes and the export size -------------------------------------------------------------------------


@pytest.mark.parametrize(("minimum", "preferred", "maximum"), [
    (1, 1, 1), (1, 512, 512), (512, 4096, 32 * MIB), (MAX_MINIMUM_BLOCK_SIZE, MAX_MINIMUM_BLOCK_SIZE, 1 << 16),
    (512, 4096, NO_PAYLOAD_LIMIT), (4096, 4096, 4096 * 3),
])  # fmt: skip
def test_block_sizes_the_spec_allows(minimum: int, preferred: int, maximum: int) -> None:
    check_block_sizes(minimum, preferred, maximum)


@pytest.mark.parametrize("minimum", [0, 3, 513, 2 * MAX_MINIMUM_BLOCK_SIZE, -512])
def test_a_minimum_block_size_that_is_not_a_power_of_two_up_to_64_kib(minimum: int) -> None:
    assert refused(check_block_sizes, minimum, 4096, 4096) == (
        f"minimum block size {minimum} is not a power of two from 1 to 65536 {SIZES}"
    )


@pytest.mark.parametrize("preferred", [256, 0, 3000])
def test_a_preferred_block_size_below_the_minimum_or_not_a_power_of_two(preferred: int) -> None:
    assert refused(check_block_sizes, 512, preferred, MIB) == (
        f"preferred block size {preferred} is not a power of two at least the minimum 512 {SIZES}"
    )


@pytest.mark.parametrize("maximum", [2048, 4096 + 100, 1000])
def test_a_maximum_payload_below_the_preferred_or_not_a_multiple_of_the_minimum(maximum: int) -> None:
    assert refused(check_block_sizes, 512, 4096, maximum) == (
        f"maximum payload {maximum} is not a multiple of the minimum block size 512 at least the preferred 4096 {SIZES}"
    )


def test_the_largest_export_size_is_2_to_the_63_minus_1() -> None:
    check_export_size((1 << 63) - 1)
    check_export_size(0)
    assert refused(check_export_size, 1 << 63) == (f"export size {1 << 63} exceeds the largest addressable size 2^63-1")


# --- Meta context names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["allocation", ":allocation", ""])
def test_a_context_name_is_namespace_colon_leaf(name: str) -> None:
    assert refused(check_context_name, name, (), True) == (
        f"meta context name {name!r} is not namespace:leaf-name (spec: Metadata querying)"
    )


@pytest.mark.parametrize(("name", "queries", "listing"), [
    ("base:allocation", ("base:allocation",), False),
    ("qemu:dirty-bitmap:a", ("qemu:dirty-bitmap:",), False),  # a wildcard outside base: (SHOULD NOT, tolerated)
    ("base:allocation", (), True),  # LIST without queries: anything
    ("base:allocation", ("base:",), True),  # the base: wildcard, when listing
    ("qemu:dirty-bitmap:b", ("qemu:dirty-bitmap:a",), True),  # query syntax outside base: is the server's
    ("x:y", ("x:z", "x:y"), False),
])  # fmt: skip
def test_contexts_that_answer_a_query(name: str, queries: tuple[str, ...], listing: bool) -> None:
    check_context_name(name, queries, listing)


@pytest.mark.parametrize(("name", "queries", "listing"), [
    ("base:allocation", ("base:",), False),  # SET ignores the base: wildcard (spec: MUST)
    ("base:allocation", ("base:foo",), True),  # in base:, LIST answers only what was asked
    ("qemu:dirty-bitmap:a", ("base:allocation",), True),
    ("x:y", ("x:z",), False),
    ("x:y", (), False),  # SET with no queries selects nothing
])  # fmt: skip
def test_contexts_nobody_asked_for(name: str, queries: tuple[str, ...], listing: bool) -> None:
    option = "NBD_OPT_LIST_META_CONTEXT" if listing else "NBD_OPT_SET_META_CONTEXT"
    assert refused(check_context_name, name, queries, listing) == (
        f"{option} answered meta context {name!r}, which the client never asked for (asked: {list(queries)})"
    )


# --- Block status: the count of descriptors, from the chunk's length ----------------------------------------

COMPACT, EXTENDED = ChunkType.BLOCK_STATUS, ChunkType.BLOCK_STATUS_EXT


@pytest.mark.parametrize(("kind", "length"), [(COMPACT, 4), (COMPACT, 13), (COMPACT, 3), (EXTENDED, 8),
                                              (EXTENDED, 8 + 17), (EXTENDED, 20)])  # fmt: skip
def test_a_chunk_that_is_not_a_whole_number_of_descriptors(kind: ChunkType, length: int) -> None:
    prefix, size = (4, 8) if kind is COMPACT else (8, 16)
    assert refused(descriptor_count, kind, length, MIB, 1, False) == (
        f"{kind.name} chunk of {length} bytes is not {prefix} + a positive multiple of {size}"
    )


def test_a_chunk_longer_than_a_client_reads() -> None:
    assert descriptor_count(COMPACT, 4 + (16 << 20), 1 << 40, 1, False) == 2 << 20
    assert refused(descriptor_count, COMPACT, 4 + (16 << 20) + 8, 1 << 40, 1, False) == (
        f"BLOCK_STATUS chunk of {(2 << 20) + 1} descriptors exceeds the 16 MiB a client reads"
    )
    assert descriptor_count(EXTENDED, 8 + (16 << 20), 1 << 40, 1, False) == 1 << 20


def test_req_one_allows_exactly_one_descriptor() -> None:
    assert descriptor_count(COMPACT, 12, MIB, 1, True) == 1
    assert refused(descriptor_count, COMPACT, 20, MIB, 1, True) == (
        "BLOCK_STATUS chunk of 2 descriptors answers a REQ_ONE request (exactly one allowed)"
    )


@pytest.mark.parametrize(
    ("requested", "minimum", "most"), [(4096, 512, 8), (1000, 512, 2), (1, 4096, 1), (4097, 1, 4097)]
)
def test_no_more_descriptors_than_can_start_inside_the_request(requested: int, minimum: int, most: int) -> None:
    assert descriptor_count(COMPACT, 4 + 8 * most, requested, minimum, False) == most
    assert refused(descriptor_count, COMPACT, 4 + 8 * (most + 1), requested, minimum, False) == (
        f"BLOCK_STATUS chunk of {most + 1} descriptors for a request of {requested} bytes: at most {most} can "
        f"start inside it (minimum block size {minimum}; the first N-1 sum to less than it)"
    )


# --- Block status: the descriptors ---------------------------------------------------------------------------


def compact(context: int, *extents: tuple[int, int]) -> memoryview:
    return memoryview(struct.pack(">I", context) + b"".join(struct.pack(">II", *e) for e in extents))


def extended(context: int, *extents: tuple[int, int], count: int | None = None) -> memoryview:
    header = struct.pack(">II", context, len(extents) if count is None else count)
    return memoryview(header + b"".join(struct.pack(">QQ", *e) for e in extents))


@pytest.mark.parametrize("many", [1, 32, 33, 1000])
@pytest.mark.parametrize("kind", [COMPACT, EXTENDED])
def test_descriptors_are_read_one_by_one_or_many_at_once_alike(kind: ChunkType, many: int) -> None:
    extents = [(512, i % 4) for i in range(many)]
    payload = (compact if kind is COMPACT else extended)(7, *extents)
    context, got = parse_block_status(kind, payload, 0, 512 * many, 512, MIB)
    assert context == 7 and [tuple(e) for e in got] == extents


@pytest.mark.parametrize("kind", [COMPACT, EXTENDED])
def test_at_most_extents_kept_extents_are_handed_over(kind: ChunkType) -> None:
    """The rest are checked, and dropped (the caller asks again from where the answer ends)."""
    assert EXTENTS_KEPT == 1 << 16
    extents = [(1, i & 3) for i in range(EXTENTS_KEPT + 1)]
    payload = (compact if kind is COMPACT else extended)(1, *extents)
    _, got = parse_block_status(kind, payload, 0, EXTENTS_KEPT + 1, 1, MIB)
    assert len(got) == EXTENTS_KEPT and [tuple(e) for e in got] == extents[:EXTENTS_KEPT]
    extents[-1] = (0, 0)
    payload = (compact if kind is COMPACT else extended)(1, *extents)
    assert refused(parse_block_status, kind, payload, 0, EXTENTS_KEPT + 1, 1, MIB) == (
        f"block status descriptor {EXTENTS_KEPT} of context 1 has length 0"
    )


@pytest.mark.parametrize("count", [2, 0, 0x01000001])
def test_an_extended_chunk_must_count_its_descriptors(count: int) -> None:
    assert refused(parse_block_status, EXTENDED, extended(3, (512, 0), count=count), 0, 512, 1, MIB) == (
        f"BLOCK_STATUS_EXT chunk says {count} descriptors but holds 1"
    )


@pytest.mark.parametrize("many", [2, 40])
def test_a_descriptor_of_length_zero(many: int) -> None:
    extents = [(512, 0)] * (many - 1) + [(0, 0)]
    assert refused(parse_block_status, COMPACT, compact(5, *extents), 0, 512 * many, 1, MIB) == (
        f"block status descriptor {many - 1} of context 5 has length 0"
    )


def test_the_first_n_minus_1_extents_cover_less_than_the_request() -> None:
    parse_block_status(COMPACT, compact(1, (511, 0), (4096, 0)), 0, 512, 1, MIB)
    assert refused(parse_block_status, COMPACT, compact(1, (512, 0), (512, 0)), 0, 512, 1, MIB) == (
        "the first 1 extents of context 1 cover 512 bytes, not less than the 512 requested "
        "(spec: NBD_REPLY_TYPE_BLOCK_STATUS)"
    )


def test_the_req_one_extent_is_no_longer_than_the_request() -> None:
    parse_block_status(COMPACT, compact(2, (512, 0)), 0, 512, 1, MIB, req_one=True)
    parse_block_status(COMPACT, compact(2, (4096, 0)), 0, 512, 1, MIB)  # without REQ_ONE it may run on
    assert refused(parse_block_status, COMPACT, compact(2, (4096, 0)), 0, 512, 1, MIB, req_one=True) == (
        "the REQ_ONE extent of context 2 is 4096 bytes, longer than the 512 requested"
    )


def test_the_extents_end_inside_the_export() -> None:
    parse_block_status(COMPACT, compact(1, (4096, 0)), MIB - 4096, 512, 512, MIB)  # exactly at the end
    assert refused(parse_block_status, COMPACT, compact(1, (4096, 0)), MIB - 512, 512, 512, MIB) == (
        f"the extents of context 1 end at {MIB + 3584}, past the end of the export ({MIB} bytes)"
    )


@pytest.mark.parametrize("minimum", [2, 512])
def test_extents_are_multiples_of_the_minimum_block_size(minimum: int) -> None:
    parse_block_status(COMPACT, compact(1, (minimum, 0), (minimum * 3, 0)), 0, 2 * minimum, minimum, MIB)
    for extents in ([(minimum + 1, 0), (minimum, 0)], [(minimum, 0), (minimum + 1, 0)]):
        assert refused(parse_block_status, COMPACT, compact(1, *extents), 0, 4 * minimum, minimum, MIB) == (
            f"an extent of context 1 is not a multiple of the minimum block size {minimum}"
        )


def test_the_last_extent_may_end_at_an_unaligned_end_of_the_export() -> None:
    size = MIB - 100
    parse_block_status(COMPACT, compact(1, (512, 0), (size - 512, 0)), 0, size, 512, size)
    parse_block_status(COMPACT, compact(1, (size, 0)), 0, size, 512, size)
    assert refused(parse_block_status, COMPACT, compact(1, (size - 512, 0)), 0, size, 512, size)


# --- A read's chunks -----------------------------------------------------------------------------------------


def test_read_coverage_in_its_words() -> None:
    coverage = ReadCoverage(4096, 1024)
    assert refused(coverage.claim, 4096 + 1000, 100) == "read chunk 5096+100 is outside the request 4096+1024"
    assert refused(coverage.claim, 4095, 1) == "read chunk 4095+1 is outside the request 4096+1024"
    coverage.claim(4096, 100)
    assert refused(coverage.claim, 4096 + 50, 10) == "read chunk 4146+10 overlaps bytes 4096-4196 already answered"
    coverage.claim(4096 + 500, 100)
    assert refused(coverage.claim, 4096 + 550, 100) == "read chunk 4646+100 overlaps bytes an earlier chunk answered"
    coverage.claim(4096 + 100, 400)
    coverage.claim(4096 + 600, 424)
    assert coverage.covered == 1024


def test_read_coverage_holds_memory_for_the_request_alone() -> None:
    """Out of order, the map of answered bytes is the request's size, wherever the request is."""
    coverage = ReadCoverage(1 << 50, 4096)
    coverage.claim((1 << 50) + 2048, 2048)  # out of order: the map is made
    coverage.claim(1 << 50, 2048)
    assert coverage.covered == 4096
