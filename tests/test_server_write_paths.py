"""The server engine's ways of taking a WRITE (nbdproto.engine._server_transmission), each against the same
rules: whole in the received bytes, into a buffer of its own while the rest arrives, straight into the
application's storage (``write_view``), or streamed in parts (``stream_writes_over``); through the fast path
for the common request or the full check alone. Every way hands over the same data with the same flags, refuses
the same requests with the same words, and takes replies the same way.
"""

from __future__ import annotations

import re
import struct
from types import SimpleNamespace
from typing import Any

import pytest

import nbdproto as n
from nbdproto.engine._server import ServerConnection
from tests.nbdbytes import joined, replies, request
from tests.test_server import events, export, handshake, new_server

C, F, TF, E = n.Command, n.CommandFlags, n.TransmissionFlags, n.Errno
MIB = 1 << 20
ALL = int(TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE)


class FullCheckOnly(ServerConnection):
    _fast_paths = False


def server(mode: str = "structured", kind: type[ServerConnection] = ServerConnection, **kw: object) -> ServerConnection:
    engine_kw = {k: kw.pop(k) for k in ("stream_writes_over",) if k in kw}
    s = kind(**engine_kw)  # type: ignore[arg-type]
    joined(s)
    kw.setdefault("flags", ALL)
    handshake(s, structured=mode != "simple", extended=mode == "extended", exp=export(**kw))
    return s


def header(cookie: int, offset: int, length: int, flags: int = 0, mode: str = "structured") -> bytes:
    extended = mode == "extended"
    return request(C.WRITE, cookie, offset, length, flags | (F.PAYLOAD_LEN if extended else 0), extended=extended)


KINDS = [ServerConnection, FullCheckOnly]


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_a_write_arriving_in_parts_gets_a_buffer_of_its_own(kind: type[ServerConnection], mode: str) -> None:
    s = server(mode, kind)
    data = bytes(range(256)) * 16
    s.receive_data(header(5, 4096, len(data), F.FUA, mode) + data[:1000])
    assert s.next_event() is n.NEED_DATA
    target = s.write_buffer()
    assert target is not None and len(target) == len(data) - 1000
    assert s.arriving_write_size == s.request_header_size + len(data)
    target[:100] = data[1000:1100]
    s.received_into(100)
    s.receive_data(data[1100:])
    (write,) = events(s)
    assert isinstance(write, n.WriteRequest) and (write.cookie, write.offset, write.flags) == (5, 4096, F.FUA)
    assert bytes(write.data) == data and not write.more and not write.in_place
    assert s.write_buffer() is None and s.arriving_write_size == 0
    s.send(n.SuccessReply(5))
    assert [c.cookie for c in replies(joined(s))] == [5]


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
def test_a_write_whose_payload_has_not_begun_goes_straight_into_place(kind: type[ServerConnection]) -> None:
    s = server("structured", kind)
    storage = bytearray(MIB)
    asked: list[tuple[int, int]] = []

    def write_view(offset: int, length: int) -> memoryview | None:
        asked.append((offset, length))
        return memoryview(storage)[offset : offset + length]

    s.write_view = write_view
    s.receive_data(header(7, 8192, 4096, F.FUA))
    assert s.next_event() is n.NEED_DATA and asked == [(8192, 4096)]
    target = s.write_buffer()
    assert target is not None and target.obj is storage  # the application's own storage
    target[:] = b"\x09" * 4096
    s.received_into(4096)
    (write,) = events(s)
    assert write.in_place and write.flags == F.FUA and (write.cookie, write.offset) == (7, 8192)
    assert bytes(storage[8192 : 8192 + 4096]) == b"\x09" * 4096
    s.send(n.SuccessReply(7))
    assert [c.cookie for c in replies(joined(s))] == [7]


def test_a_write_whose_payload_has_begun_or_that_the_view_declines_is_not_in_place() -> None:
    for first, offered in ((b"\x01", True), (b"", False)):
        s = server()
        s.write_view = lambda offset, length, offered=offered: memoryview(bytearray(length)) if offered else None
        s.receive_data(header(7, 0, 4096) + first)
        assert s.next_event() is n.NEED_DATA
        s.receive_data(bytes(4096 - len(first)))
        (write,) = events(s)
        assert not write.in_place and bytes(write.data) == first + bytes(4096 - len(first))


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_a_large_write_streams_in_parts_with_its_flags(mode: str) -> None:
    s = server(mode, stream_writes_over=4096)
    s.receive_data(header(9, 0, 8192, F.FUA, mode))
    (first,) = events(s)
    assert isinstance(first, n.WriteRequest) and first.more and first.flags == F.FUA
    assert bytes(first.data) == b""  # the header alone: nothing of the payload yet
    s.receive_data(b"\x01" * 5000)
    (part,) = events(s)
    assert (part.cookie, part.offset, bytes(part.data), part.last) == (9, 0, b"\x01" * 5000, False)
    s.receive_data(b"\x02" * 3192)
    (last,) = events(s)
    assert (last.offset, bytes(last.data), last.last) == (5000, b"\x02" * 3192, True)


def test_a_write_of_exactly_the_streaming_size_is_not_streamed() -> None:
    s = server(stream_writes_over=4096)
    s.receive_data(header(9, 0, 4096))
    assert s.next_event() is n.NEED_DATA and s.write_buffer() is not None
    s.receive_data(bytes(4096))
    (write,) = events(s)
    assert not write.more and len(write.data) == 4096


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
def test_a_write_of_exactly_the_maximum_payload_is_taken(kind: type[ServerConnection]) -> None:
    s = server("simple", kind, size=4 * MIB, maximum_payload=MIB)
    s.receive_data(header(1, 0, MIB, mode="simple") + bytes(MIB))
    (write,) = events(s)
    assert len(write.data) == MIB


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
@pytest.mark.parametrize(("offset", "length"), [(512, 1), (512, 513), (1, 512), (0, 700)])
def test_an_unaligned_write_is_refused_whichever_way_it_goes(
    kind: type[ServerConnection], offset: int, length: int
) -> None:
    s = server("structured", kind, minimum_block_size=512)
    s.receive_data(header(3, offset, length) + bytes(length))
    assert events(s) == []
    (chunk,) = replies(joined(s))
    assert (chunk.error, chunk.fields.message) == (
        E.EINVAL,
        f"offset {offset} / length {length} not aligned to 512 bytes",
    )


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
def test_an_arriving_write_the_rules_refuse_is_answered_and_its_payload_skipped(kind: type[ServerConnection]) -> None:
    s = server("structured", kind, flags=ALL | TF.READ_ONLY)
    s.receive_data(header(4, 0, 4096) + bytes(10))
    assert events(s) == []
    (chunk,) = replies(joined(s))
    assert (chunk.cookie, chunk.error, chunk.fields.message) == (4, E.EPERM, "WRITE on a read-only export")
    s.receive_data(bytes(4096 - 10) + request(C.FLUSH, 5))
    assert [type(e) for e in events(s)] == [n.FlushRequest]


def test_a_compact_write_with_payload_len_arriving_is_refused_for_that() -> None:
    s = server("structured")
    s.receive_data(request(C.WRITE, 4, 0, 4096, F.PAYLOAD_LEN) + bytes(10))
    assert events(s) == []
    (chunk,) = replies(joined(s))
    assert (chunk.error, chunk.fields.message) == (E.EINVAL, "WRITE takes no payload here")


def test_a_read_past_the_end_of_an_empty_export_is_einval() -> None:
    """No RESIZE ever shrank it: past the end is EINVAL (ENOSPC is for the tail a RESIZE cut off)."""
    s = server("structured", size=0)
    s.receive_data(request(C.READ, 1, 0, 1))
    assert events(s) == []
    (chunk,) = replies(joined(s))
    assert (chunk.error, chunk.fields.message) == (E.EINVAL, "offset 0 + length 1 is past the export size 0")


def test_a_block_status_chunk_holds_at_most_2_to_the_20_descriptors() -> None:
    size = (1 << 20) + 10
    s = new_server()
    handshake(s, structured=True, contexts=(n.BASE_ALLOCATION,), exp=export(size=size, maximum_payload=32 * MIB))
    s.receive_data(request(C.BLOCK_STATUS, 2, 0, size))
    events(s)
    s.send(n.BlockStatusReply(2, {1: tuple(n.Extent(1, i & 1) for i in range(size))}))
    sent = joined(s)
    magic, flags, kind, cookie, length = struct.unpack_from(">IHHQI", sent)  # by hand: 2^20 is a lot to decode
    assert magic == n.wire.STRUCTURED_REPLY_MAGIC
    assert (kind, cookie, flags, length) == (n.ChunkType.BLOCK_STATUS, 2, n.ReplyFlags.DONE, 4 + 8 * (1 << 20))
    assert len(sent) == 20 + length


def test_a_streamed_write_is_answered_only_after_its_last_part() -> None:
    s = server(stream_writes_over=4096)
    s.receive_data(header(9, 0, 8192) + bytes(100) + request(C.FLUSH, 1))
    events(s)
    with pytest.raises(n.LocalProtocolError) as refused:
        s.send(n.SuccessReply(9))
    assert str(refused.value) == "write 0x9 cannot be answered before its whole payload arrived"
    s = server(stream_writes_over=4096)
    s.receive_data(request(C.FLUSH, 1) + header(9, 0, 8192) + bytes(100))
    assert [type(e) for e in events(s)] == [n.FlushRequest, n.WriteRequest]
    s.send(n.SuccessReply(1))  # another request may be answered meanwhile
    assert [c.cookie for c in replies(joined(s))] == [1]


KIB = 1 << 10
# A WRITE (its payload all in the same chunk) that breaks one rule, as (offset, length, flags, cookie, the words of
# its refusal): behind a good READ in one received chunk it meets the loop that queues every valid request of a
# chunk at once (_queue_requests), alone it meets the full check; both must refuse it alike.
BAD_WRITES = {
    "past the end": (
        MIB - 4 * KIB,
        8 * KIB,
        0,
        2,
        f"offset {MIB - 4 * KIB} + length {8 * KIB} is past the export size {MIB}",
    ),
    "at the end": (MIB, 4 * KIB, 0, 2, f"offset {MIB} + length {4 * KIB} is past the export size {MIB}"),
    "unaligned offset": (100, 4 * KIB, 0, 2, f"offset 100 / length {4 * KIB} not aligned to 512 bytes"),
    "unaligned length": (0, 4 * KIB + 1, 0, 2, f"offset 0 / length {4 * KIB + 1} not aligned to 512 bytes"),
    "over the payload limit": (0, 128 * KIB, 0, 2, None),
    "a cookie in flight": (0, 4 * KIB, 0, 1, None),
    "a flag it may not carry": (0, 4 * KIB, int(F.DF), 2, None),
}


def _answered(s: ServerConnection, chunk: bytes) -> tuple[list[tuple[str, int]], list[tuple[int, int, str]]]:
    """What the engine makes of ``chunk``: its events (type, cookie) and its error replies."""
    s.receive_data(chunk)
    got = [(type(e).__name__, e.cookie) for e in events(s)]
    errors = [(c.cookie, int(c.error), c.fields.message) for c in replies(joined(s)) if c.error]
    return got, errors


def _answered_alike(chunk: bytes, mode: str = "structured", *, may_end: bool = False, **kw: object) -> Any:
    """What the engine makes of ``chunk`` (``_answered``) with its fast paths and with the full check alone,
    which must be the same; with ``may_end``, the words of the protocol error that ended the connection too."""
    seen: list[Any] = []
    for kind in KINDS:
        s = server(mode, kind, **kw)
        try:
            seen.append(_answered(s, chunk))
        except n.RemoteProtocolError as exc:
            if not may_end:
                raise
            seen.append(str(exc))
    assert seen[0] == seen[1]
    return seen[0]


@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_a_bad_write_behind_a_good_read_in_one_chunk_is_refused_as_the_full_check_refuses_it(case: str) -> None:
    offset, length, flags, cookie, words = BAD_WRITES[case]
    chunk = request(C.READ, 1, 0, 4 * KIB) + header(cookie, offset, length, flags) + bytes(length) + request(C.FLUSH, 3)
    got, errors = _answered_alike(chunk, minimum_block_size=512, maximum_payload=64 * KIB)
    assert got[0] == ("ReadRequest", 1) and ("WriteRequest", cookie) not in got[1:]
    if case == "a cookie in flight":  # the spec leaves a client that reuses a cookie in flight undefined: we end it
        assert got == [("ReadRequest", 1)]
        return
    assert got[-1] == ("FlushRequest", 3)
    assert [e[0] for e in errors] == [cookie] and errors[0][1] != 0
    if words is not None:
        assert errors[0][2] == words


BAD_READS = {
    "past the end": (
        MIB - 4 * KIB,
        8 * KIB,
        f"offset {MIB - 4 * KIB} + length {8 * KIB} is past the export size {MIB}",
    ),
    "at the end": (MIB, 4 * KIB, f"offset {MIB} + length {4 * KIB} is past the export size {MIB}"),
    "unaligned offset": (100, 4 * KIB, f"offset 100 / length {4 * KIB} not aligned to 512 bytes"),
    "unaligned length": (0, 4 * KIB + 1, f"offset 0 / length {4 * KIB + 1} not aligned to 512 bytes"),
    "over the payload limit": (0, 128 * KIB, None),
}


@pytest.mark.parametrize("case", list(BAD_READS))
def test_a_bad_read_among_good_reads_in_one_chunk_is_refused_as_the_full_check_refuses_it(case: str) -> None:
    """The READs of a chunk are queued by one loop over their headers (_queue_reads): one that breaks a rule
    between two good ones is refused there as the full check refuses it alone, and the good ones go on."""
    offset, length, words = BAD_READS[case]
    good = [request(C.READ, cookie, 4 * KIB * cookie, 4 * KIB) for cookie in (1, 3, 4, 5)]
    for at in (1, 2):  # where the loop checks its first header, and where it checks the ones after
        chunk = b"".join(good[:at]) + request(C.READ, 2, offset, length) + b"".join(good[at:])
        got, errors = _answered_alike(chunk, minimum_block_size=512, maximum_payload=64 * KIB)
        assert got == [("ReadRequest", cookie) for cookie in (1, 3, 4, 5)]
        assert [e[0] for e in errors] == [2] and errors[0][1] != 0
        if words is not None:
            assert errors[0][2] == words


def test_a_read_reusing_a_cookie_in_flight_behind_good_reads_ends_as_alone() -> None:
    chunk = request(C.READ, 1, 0, 4 * KIB) + request(C.READ, 2, 0, 4 * KIB) + request(C.READ, 1, 0, 4 * KIB)
    got, _ = _answered_alike(chunk, minimum_block_size=512)
    assert ("ReadRequest", 2) in got and got.count(("ReadRequest", 1)) == 1


@pytest.mark.parametrize("mode", ["structured", "extended"])
@pytest.mark.parametrize("odd", ["a READ with DF", "a READ with FUA", "a FLUSH", "a WRITE", "a bad magic"])
def test_a_read_row_stops_at_anything_but_a_plain_read_and_the_full_check_takes_it(mode: str, odd: str) -> None:
    """_queue_reads checks magic, flags and type of each header as one number: a request among the READs that
    differs in any of the three (a flag, another command, a broken magic) leaves the row to the full check,
    which answers it as it would alone."""
    extended = mode == "extended"

    def read(cookie: int, flags: int = 0) -> bytes:
        return request(C.READ, cookie, 4 * KIB * cookie, 4 * KIB, flags, extended=extended)

    middle = {
        "a READ with DF": read(3, int(F.DF)),
        "a READ with FUA": read(3, int(F.FUA)),
        "a FLUSH": request(C.FLUSH, 3, extended=extended),
        "a WRITE": header(3, 0, 4 * KIB, mode=mode) + bytes(4 * KIB),
        "a bad magic": b"\x25\x60\x95\x14" + read(3)[4:],
    }[odd]
    # A FLUSH closes the chunk: a row of READs behind the odd one must end where they do, not past it.
    chunk = read(1) + read(2) + middle + read(4) + read(5) + request(C.FLUSH, 6, extended=extended)
    answered = _answered_alike(chunk, mode, may_end=True, minimum_block_size=512)
    if odd == "a bad magic":
        assert "request magic 0x25609514" in answered
        return
    got, errors = answered
    assert [cookie for _, cookie in got] == [1, 2, 3, 4, 5, 6] and errors == []
    assert got[2][0] == ("WriteRequest" if odd == "a WRITE" else "FlushRequest" if odd == "a FLUSH" else "ReadRequest")


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_the_reads_of_a_row_carry_every_field_the_constructor_gives(mode: str) -> None:
    """The row of READs is made without ReadRequest.__init__ (bench/bench_engine.py): each must hold what the
    constructor would give it, the buffer left out of == included."""
    extended = mode == "extended"
    s = server(mode)
    s.receive_data(b"".join(request(C.READ, c, 4 * KIB * c, 4 * KIB, extended=extended) for c in (1, 2, 3)))
    got = events(s)
    for made in got:
        expected = n.ReadRequest(made.cookie, 4 * KIB * made.cookie, 4 * KIB)
        assert made == expected and repr(made) == repr(expected)
        assert made.flags is expected.flags and made.buffer is None


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_the_whole_writes_of_a_chunk_carry_every_field_the_constructor_gives(mode: str) -> None:
    """Whole writes queued from one received chunk are made without WriteRequest.__init__: each must hold what
    the constructor would give it (FUA kept, nothing streamed or in place)."""
    s = server(mode)
    payloads = {c: bytes([c]) * (4 * KIB) for c in (1, 2, 3)}
    fua = {1: F(0), 2: F.FUA, 3: F(0)}
    s.receive_data(b"".join(header(c, 4 * KIB * c, 4 * KIB, fua[c], mode) + payloads[c] for c in (1, 2, 3)))
    got = events(s)
    assert [type(made).__name__ for made in got] == ["WriteRequest"] * 3
    for made in got:
        c = made.cookie
        expected = n.WriteRequest(c, 4 * KIB * c, memoryview(payloads[c]), fua[c])
        assert made == expected  # every field (the data's bytes compared)
        assert made.flags is expected.flags and (made.more, made.in_place) == (False, False)
        assert type(made.data) is memoryview and bytes(made.data) == payloads[c]


def _reads(first: int, count: int, mode: str = "structured") -> bytes:
    """``count`` good READs of 4 KiB, cookies from ``first`` on."""
    extended = mode == "extended"
    return b"".join(request(C.READ, c, 4 * KIB * c, 4 * KIB, extended=extended) for c in range(first, first + count))


# Requests of other kinds behind good READs in one received chunk, by mode, with the event each is (None: refused):
# the loops that queue a chunk's valid requests at once (_queue_requests, _queue_reads) must leave each to the full
# check, which takes it or refuses it as it would alone; the READs behind it (20 of them: more bytes than a request
# here is long) go on either way.
OTHERS = {
    "a READ with DF": ("structured", request(C.READ, 2, 0, 512, F.DF), "ReadRequest"),
    "a zero-length READ": ("structured", request(C.READ, 2, 0, 0), None),
    "a TRIM": ("structured", request(C.TRIM, 2, 0, 512), "TrimRequest"),
    "a WRITE_ZEROES": ("structured", request(C.WRITE_ZEROES, 2, 0, 512, F.FUA), "WriteZeroesRequest"),
    "a CACHE": ("structured", request(C.CACHE, 2, 0, 512), "CacheRequest"),
    "a FLUSH": ("structured", request(C.FLUSH, 2), "FlushRequest"),
    "a zero-length WRITE": ("structured", request(C.WRITE, 2, 0, 0), None),
    "a compact WRITE with PAYLOAD_LEN": ("structured", request(C.WRITE, 2, 0, 512, F.PAYLOAD_LEN) + bytes(512), None),
    "an extended WRITE without PAYLOAD_LEN": ("extended", request(C.WRITE, 2, 0, 512, extended=True), None),
    "an extended TRIM": ("extended", request(C.TRIM, 2, 0, 512, extended=True), "TrimRequest"),
}


@pytest.mark.parametrize("case", list(OTHERS))
def test_other_requests_among_good_reads_in_one_chunk_are_taken_as_the_full_check_takes_them(case: str) -> None:
    mode, other, taken = OTHERS[case]
    for at in (0, 1, 2):  # right behind the READ taken first, and among the READs queued behind it
        chunk = request(C.READ, 1, 0, 4 * KIB, extended=mode == "extended") + _reads(3, at, mode)
        chunk += other + _reads(3 + at, 20, mode)
        got, errors = _answered_alike(chunk, mode, minimum_block_size=512, maximum_payload=64 * KIB)
        reads = [("ReadRequest", c) for c in range(3, 23 + at)]
        if taken is None:
            assert got == [("ReadRequest", 1), *reads] and [e[0] for e in errors] == [2]
        else:
            assert got == [("ReadRequest", 1), *reads[:at], (taken, 2), *reads[at:]] and errors == []


def test_other_requests_in_one_chunk_are_refused_in_words() -> None:
    """Which of OTHERS the full check refuses, and with which words."""
    for case, words in (
        ("a zero-length READ", "READ of length 0"),
        ("a zero-length WRITE", "WRITE of length 0"),
        ("a compact WRITE with PAYLOAD_LEN", "WRITE takes no payload here"),
        ("an extended WRITE without PAYLOAD_LEN", "extended NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN"),
    ):
        mode, other, _ = OTHERS[case]
        s = server(mode, minimum_block_size=512)
        _, errors = _answered(s, request(C.READ, 1, 0, 4 * KIB, extended=mode == "extended") + other)
        assert errors == [(2, int(E.EINVAL), words)], case


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_a_bad_magic_behind_good_requests_in_one_chunk_ends_the_connection(mode: str) -> None:
    extended = mode == "extended"
    codec_magic = 0x21E41C71 if extended else 0x25609513
    for bad in (
        request(C.READ, 2, 0, 4 * KIB, extended=extended),
        header(2, 0, 4 * KIB, mode=mode) + bytes(4 * KIB),
    ):
        bad = b"\x12\x34\x56\x78" + bad[4:]
        for at in (0, 1, 2):
            s = server(mode, minimum_block_size=512)
            s.receive_data(request(C.READ, 1, 0, 4 * KIB, extended=extended) + _reads(3, at, mode) + bad)
            got = []
            with pytest.raises(n.RemoteProtocolError) as ended:
                while True:
                    got.append(s.next_event())
            assert [(type(e), e.cookie) for e in got] == [(n.ReadRequest, c) for c in (1, *range(3, 3 + at))]
            assert str(ended.value).startswith(f"request magic 0x12345678 is not {codec_magic:#x}")


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_good_reads_then_part_of_a_header_in_one_chunk(mode: str) -> None:
    """A chunk that ends part-way through a header: the whole requests before it are taken, the part waits."""
    last = request(C.READ, 9, 0, 4 * KIB, extended=mode == "extended")
    for at in (1, 2, 3):
        s = server(mode, minimum_block_size=512)
        s.receive_data(request(C.READ, 1, 0, 4 * KIB, extended=mode == "extended") + _reads(3, at, mode) + last[:10])
        assert [e.cookie for e in events(s)] == [1, *range(3, 3 + at)]  # type: ignore[attr-defined]
        assert s.receiving_request
        s.receive_data(last[10:])
        assert [e.cookie for e in events(s)] == [9]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS, ids=["fast", "full"])
@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_whole_writes_in_one_chunk_are_handed_over_with_their_flags(kind: type[ServerConnection], mode: str) -> None:
    for first, second in ((F.FUA, 0), (0, F.FUA)):
        s = server(mode, kind)
        s.receive_data(
            header(5, 4096, 512, first, mode) + b"\x05" * 512 + header(6, 0, 512, second, mode) + b"\x06" * 512
        )
        got = [(e.cookie, e.offset, e.flags, bytes(e.data), e.more) for e in events(s)]  # type: ignore[attr-defined]
        assert got == [(5, 4096, first, b"\x05" * 512, False), (6, 0, second, b"\x06" * 512, False)]


def test_a_row_of_reads_is_read_only_from_a_layout_that_starts_with_magic_flags_and_type() -> None:
    """_queue_reads reads magic, flags and type as one 64-bit number: it takes the request layouts' word for it,
    and a layout that does not start with those three fields (4 + 2 + 2 bytes) is refused where it is derived."""
    from nbdproto.engine._server_requests import _read_rows
    from nbdproto.wire import headers

    # The spec's request magics, NBD_REQUEST_MAGIC and NBD_EXTENDED_REQUEST_MAGIC, then no flags and READ (0).
    for codec, magic in ((headers.REQUEST, 0x25609513), (headers.EXTENDED_REQUEST, 0x21E41C71)):
        rows, head = _read_rows(codec)
        assert rows.size == codec.size
        assert head == magic << 32
        one = request(C.READ, 9, 4096, 512, extended=codec is headers.EXTENDED_REQUEST)
        assert rows.unpack(one) == (head, 9, 4096, 512)
    good = {"struct": struct.Struct(">LHHQQL"), "magic": 0x25609513, "names": ("magic", "flags", "type", "a", "b", "c")}
    unlike = [
        headers.SIMPLE_REPLY,
        headers.OPTION_REQUEST,
        SimpleNamespace(**{**good, "name": "no magic", "magic": None}),
        SimpleNamespace(**{**good, "name": "wider fields", "struct": struct.Struct(">QHHQQL")}),
        SimpleNamespace(**{**good, "name": "other fields", "names": ("magic", "error", "type", "a", "b", "c")}),
    ]
    for codec in unlike:
        words = f"^{re.escape(codec.name)} \\(.*\\) does not start with magic, flags and type$"
        with pytest.raises(TypeError, match=words):
            _read_rows(codec)  # type: ignore[arg-type]
