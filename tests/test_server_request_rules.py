"""How the server engine refuses requests and the replies it refuses to send (nbdproto.engine._server_transmission),
in words: each refused request's error chunk (the error, its words and where it points), the requests that end
the connection, the application's replies it will not send, and how it makes the application's extents fit.
tests/test_server.py checks the error numbers in every reply form; here the words and the edges.
"""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
from nbdproto.engine._server import ServerConnection
from tests.nbdbytes import joined, option, replies, request
from tests.test_server import events, export, handshake, new_server

C, F, TF, E, OPT = n.Command, n.CommandFlags, n.TransmissionFlags, n.Errno, n.Option
MIB = 1 << 20
SIZE = 4 * MIB
ALL = int(TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE)


def serving(mode: str, contexts: tuple[str, ...] = (), **kw: object) -> ServerConnection:
    s = new_server()
    kw.setdefault("flags", ALL)
    handshake(s, structured=mode != "simple", extended=mode == "extended", contexts=contexts, exp=export(**kw))
    return s


def refusals(s: ServerConnection, data: bytes) -> list[tuple[int, int, str, int]]:
    """Feed ``data``; each error chunk sent as (cookie, error, message, the offset the chunk names)."""
    s.receive_data(data)
    assert events(s) == [], "a refused request reached the application"
    out = []
    for chunk in replies(joined(s)):
        assert chunk.chunk_type == n.ChunkType.ERROR and chunk.flags == n.ReplyFlags.DONE, chunk
        out.append((chunk.cookie, chunk.error, chunk.fields.message, chunk.offset))
    return out


@pytest.mark.parametrize("mode", ["structured", "extended"])
@pytest.mark.parametrize(
    ("command", "offset", "length", "flags", "error", "message"),
    [
        (42, 0, 512, 0, E.EINVAL, "unknown command 42"),
        (C.READ, SIZE - 512, 1024, 0, E.EINVAL, f"offset {SIZE - 512} + length 1024 is past the export size {SIZE}"),
        (C.WRITE_ZEROES, SIZE, 512, 0, E.ENOSPC, f"offset {SIZE} + length 512 is past the export size {SIZE}"),
        (C.READ, 0, 0, 0, E.EINVAL, "READ of length 0"),
        (C.READ, 1, 512, 0, E.EINVAL, "offset 1 / length 512 not aligned to 512 bytes"),
        (C.TRIM, 0, 512, F.NO_HOLE, E.EINVAL, "flags 0x2 are not valid for TRIM"),
        (C.RESIZE, 2 * MIB, 0, 0, E.EINVAL, "RESIZE was not advertised for this export"),
        (C.READ, 0, 2 * MIB, 0, E.EOVERFLOW, f"read of {2 * MIB} bytes exceeds the maximum payload {MIB}"),
    ],
)
def test_a_refused_request_gets_an_error_chunk_in_words(
    mode: str, command: int, offset: int, length: int, flags: int, error: int, message: str
) -> None:
    s = serving(mode, size=SIZE, minimum_block_size=512, maximum_payload=MIB)
    got = refusals(s, request(command, 7, offset, length, flags, extended=mode == "extended"))
    assert got == [(7, error, message, offset if mode == "extended" else 0)]


def test_an_oversized_compact_write_is_refused_and_its_payload_dropped() -> None:
    s = serving("structured", maximum_payload=MIB)
    payload = 2 * MIB
    got = refusals(s, request(C.WRITE, 3, 0, payload) + bytes(payload - 1))
    assert got == [(3, E.EINVAL, f"write of {payload} bytes exceeds the maximum payload", 0)]
    s.receive_data(b"\0" + request(C.FLUSH, 4))
    assert [type(e) for e in events(s)] == [n.FlushRequest]  # the next request, after the skipped payload


def test_an_oversized_extended_payload_ends_the_connection() -> None:
    s = serving("extended", maximum_payload=MIB)
    s.receive_data(request(C.WRITE, 3, 0, 2 * MIB, F.PAYLOAD_LEN, extended=True))
    with pytest.raises(n.RemoteProtocolError) as broken:
        events(s)
    assert str(broken.value) == f"request payload of {2 * MIB} bytes exceeds the maximum {MIB}"


@pytest.mark.parametrize(("extended", "codec"), [(False, "RequestHeader"), (True, "ExtendedRequestHeader")])
def test_a_wrong_request_magic_ends_the_connection(extended: bool, codec: str) -> None:
    s = serving("extended" if extended else "structured")
    header = bytearray(request(C.READ, 1, 0, 512, extended=extended))
    header[:4] = b"\xde\xad\xbe\xef"
    s.receive_data(bytes(header))
    with pytest.raises(n.RemoteProtocolError) as broken:
        events(s)
    expected = n.wire.EXTENDED_REQUEST_MAGIC if extended else n.wire.REQUEST_MAGIC
    assert str(broken.value) == f"request magic 0xdeadbeef is not {expected:#x} ({codec})"


def test_payload_len_only_where_a_payload_belongs() -> None:
    s = serving("extended")
    got = refusals(s, request(C.READ, 5, 0, 8, F.PAYLOAD_LEN, extended=True) + bytes(8))
    assert got == [(5, E.EINVAL, "READ takes no payload here", 0)]
    s = serving("extended")
    got = refusals(s, request(C.WRITE, 6, 0, 512, extended=True))
    assert got == [(6, E.EINVAL, "extended NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN", 0)]


def test_an_extended_write_whose_payload_is_on_its_way_is_checked_first() -> None:
    s = serving("extended", flags=ALL | TF.READ_ONLY)
    data = request(C.WRITE, 8, 0, 4096, F.PAYLOAD_LEN, extended=True) + bytes(100)  # most of it still to come
    assert refusals(s, data) == [(8, E.EPERM, "WRITE on a read-only export", 0)]
    s.receive_data(bytes(4096 - 100) + request(C.FLUSH, 9, extended=True))
    assert [type(e) for e in events(s)] == [n.FlushRequest]


def test_block_status_payloads_in_words() -> None:
    contexts = (n.BASE_ALLOCATION, "example:odd-blocks")
    s = serving("extended", contexts)

    def ask(cookie: int, payload: bytes) -> list[tuple[int, int, str, int]]:
        flags = F.PAYLOAD_LEN
        return refusals(s, request(C.BLOCK_STATUS, cookie, 4096, len(payload), flags, extended=True) + payload)

    assert ask(1, struct.pack(">QI", 8192, 3)) == [
        (1, E.EINVAL, "block status context ids [3] are empty, repeated or not negotiated", 4096)
    ]
    assert ask(2, struct.pack(">QII", 8192, 1, 1)) == [
        (2, E.EINVAL, "block status context ids [1, 1] are empty, repeated or not negotiated", 4096)
    ]
    assert ask(3, struct.pack(">Q", 8192)) == [
        (3, E.EINVAL, "block status context ids [] are empty, repeated or not negotiated", 4096)
    ]
    assert ask(4, struct.pack(">QI", 8192, 1)[:10]) == [
        (4, E.EINVAL, "block status payload of 10 bytes is not 8 + 4n", 4096)
    ]
    assert ask(5, b"1234") == [(5, E.EINVAL, "block status payload of 4 bytes is not 8 + 4n", 4096)]


def test_block_status_payloads_need_the_flag() -> None:
    s = new_server()
    s.receive_data(b"\0\0\0\3" + option(OPT.EXTENDED_HEADERS))  # extended headers, no meta context
    events(s)
    s.receive_data(option(OPT.GO, b"\0\0\0\4disk\0\0"))
    assert isinstance(events(s)[0], n.ExportRequested)
    s.send(export())
    events(s)
    joined(s)
    payload = struct.pack(">QI", 4096, 1)
    got = refusals(s, request(C.BLOCK_STATUS, 1, 0, len(payload), F.PAYLOAD_LEN, extended=True) + payload)
    assert got == [(1, E.EINVAL, "block status payloads were not advertised", 0)]


def test_after_a_shrinking_resize_the_old_tail_is_enospc() -> None:
    """RESIZE extension: a range between the new end and the old one fails with ENOSPC, past the old one as
    any range past the end."""
    s = serving("structured", flags=ALL | TF.SEND_RESIZE, minimum_block_size=512)
    s.receive_data(request(C.RESIZE, 1, MIB // 2, 0))
    assert [type(e) for e in events(s)] == [n.ResizeRequest]
    s.send(n.SuccessReply(1))
    joined(s)
    half = MIB // 2
    assert refusals(s, request(C.READ, 2, half, 512)) == [
        (2, E.ENOSPC, f"offset {half} + length 512 is past the export size {half}", 0)
    ]
    assert refusals(s, request(C.READ, 3, MIB, 512)) == [
        (3, E.EINVAL, f"offset {MIB} + length 512 is past the export size {half}", 0)
    ]
    assert refusals(s, request(C.READ, 4, half - 512, 1024)) == [
        (4, E.ENOSPC, f"offset {half - 512} + length 1024 is past the export size {half}", 0)
    ]
    assert refusals(s, request(C.READ, 6, MIB - 512, 512)) == [  # ending exactly at the old end
        (6, E.ENOSPC, f"offset {MIB - 512} + length 512 is past the export size {half}", 0)
    ]
    assert refusals(s, request(C.READ, 7, half - 1024, 1000)) == [  # unaligned, inside: EINVAL for that
        (7, E.EINVAL, f"offset {half - 1024} / length 1000 not aligned to 512 bytes", 0)
    ]
    assert refusals(s, request(C.READ, 8, half - 500, 500)) == [  # unaligned, ending at the new end
        (8, E.EINVAL, f"offset {half - 500} / length 500 not aligned to 512 bytes", 0)
    ]
    assert refusals(s, request(C.READ, 9, half - 12, 524)) == [  # unaligned, ending a block past the new end
        (9, E.ENOSPC, f"offset {half - 12} + length 524 is past the export size {half}", 0)
    ]
    s.receive_data(request(C.READ, 5, half - 512, 512))
    assert [type(e) for e in events(s)] == [n.ReadRequest]
    grow = serving("structured", flags=ALL | TF.SEND_RESIZE)
    grow.receive_data(request(C.RESIZE, 1, 2 * MIB, 0))
    events(grow)
    grow.send(n.SuccessReply(1))
    joined(grow)
    grow.receive_data(request(C.READ, 2, 2 * MIB - 512, 512))
    assert [type(e) for e in events(grow)] == [n.ReadRequest]  # grown: the new size holds
    assert refusals(grow, request(C.READ, 3, 2 * MIB, 512)) == [
        (3, E.EINVAL, f"offset {2 * MIB} + length 512 is past the export size {2 * MIB}", 0)
    ]


def _in_flight(mode: str, *data: bytes, **kw: object) -> ServerConnection:
    s = serving(mode, (n.BASE_ALLOCATION,) if mode != "simple" else (), **kw)
    s.receive_data(b"".join(data))
    events(s)
    return s


def local_error(s: ServerConnection, event: object) -> str:
    with pytest.raises(n.LocalProtocolError) as refused:
        s.send(event)  # type: ignore[arg-type]
    return str(refused.value)


def test_replies_the_server_will_not_send_in_words() -> None:
    s = _in_flight("structured", request(C.FLUSH, 1))
    assert local_error(s, n.SuccessReply(0x63)) == "no request with cookie 0x63 is waiting for a reply"
    s = _in_flight("extended", request(C.FLUSH, 1, extended=True))
    assert local_error(s, n.ErrorReply(0x63, E.EIO)) == "no request with cookie 0x63 is waiting for a reply"
    s = _in_flight("structured", request(C.FLUSH, 1))
    assert local_error(s, n.ReadData(0x63, 0, b"x")) == "read reply for cookie 0x63, which is no request"
    s = _in_flight("simple", request(C.FLUSH, 1))
    assert local_error(s, n.ReadHole(0x63, 0, 512)) == "read reply for cookie 0x63, which is no request"
    s = _in_flight("structured", request(C.FLUSH, 1), request(C.READ, 2, 4096, 512))
    assert local_error(s, n.ErrorReply(1, E.OK)) == "ErrorReply needs a non-zero error"
    s = _in_flight("structured", request(C.READ, 2, 4096, 512))
    assert (
        local_error(s, n.ErrorReply(2, E.EIO, offset=4096 + 512)) == "error offset 4608 is outside the request 4096+512"
    )
    s = _in_flight("structured", request(C.READ, 2, 4096, 512))
    assert local_error(s, n.ErrorReply(2, E.EIO, offset=4095)) == "error offset 4095 is outside the request 4096+512"
    s = _in_flight("structured", request(C.FLUSH, 3))
    assert local_error(s, n.ErrorReply(3, E.EIO, offset=1)) == "error offset 1 is outside the request 0+0"
    s = _in_flight("simple", request(C.READ, 2, 0, 1024))
    s.send(n.ReadData(2, 0, bytes(512), done=False))
    assert local_error(s, n.ErrorReply(2, E.EIO)) == (
        "read 0x2 already sent data in a simple reply; an error can only be a disconnect"
    )
    s = _in_flight("structured", request(C.READ, 2, 0, 512))
    assert local_error(s, n.BlockStatusReply(2, {1: (n.Extent(512, 0),)})) == (
        "block status sent for cookie 0x2, a ReadRequest"
    )
    s = _in_flight("structured", request(C.BLOCK_STATUS, 2, 0, 512))
    assert local_error(s, n.BlockStatusReply(2, {1: (), 2: ()})) == (
        "block status reply covers contexts [1, 2], the request asked for [1]"
    )


def test_error_offsets_inside_the_request_are_sent() -> None:
    s = _in_flight("extended", request(C.READ, 2, 4096, 512, extended=True))
    s.send(n.ErrorReply(2, E.EIO, "bad sector", offset=4096 + 511))
    (chunk,) = replies(joined(s))
    assert (chunk.chunk_type, chunk.fields.offset, chunk.fields.message, chunk.offset) == (
        n.ChunkType.ERROR_OFFSET, 4607, "bad sector", 4096
    )  # fmt: skip
    s = _in_flight("structured", request(C.FLUSH, 3))
    s.send(n.ErrorReply(3, E.EIO, "flush failed", offset=0))  # a request without a range: offset 0 only
    (chunk,) = replies(joined(s))
    assert (chunk.chunk_type, chunk.fields.offset) == (n.ChunkType.ERROR_OFFSET, 0)


@pytest.mark.parametrize(
    ("extents", "message"),
    [
        ((n.Extent(0, 0),), "extent length 0 must be positive"),
        ((n.Extent(-512, 0),), "extent length -512 must be positive"),
        ((n.Extent(512, 1 << 32),), "extent status 0x100000000 does not fit the descriptor"),
        ((n.Extent(512, -1),), "extent status -0x1 does not fit the descriptor"),
        ((n.Extent(700, 0),), "extent length 700 is not a multiple of the 512-byte block"),
        ((), "a block status reply needs at least one extent per context"),
    ],
)
def test_extents_the_server_will_not_send(extents: tuple[n.Extent, ...], message: str) -> None:
    s = _in_flight("structured", request(C.BLOCK_STATUS, 2, 0, 4096), minimum_block_size=512)
    assert local_error(s, n.BlockStatusReply(2, {1: extents})) == message


def _status(
    mode: str, extents: tuple[n.Extent, ...], length: int = 4096, flags: int = 0, **kw: object
) -> list[tuple[int, int]]:
    s = _in_flight(mode, request(C.BLOCK_STATUS, 2, 0, length, flags, extended=mode == "extended"), **kw)
    s.send(n.BlockStatusReply(2, {1: extents}))
    (chunk,) = replies(joined(s))
    return [(d.length, d.status) for d in chunk.fields.descriptors]


def test_extents_are_made_to_fit() -> None:
    # Cut at the request's end (the last one may run past it, the rest are dropped).
    assert _status("structured", (n.Extent(1024, 0), n.Extent(8192, 3), n.Extent(512, 1))) == [(1024, 0), (8192, 3)]
    # A whole number of blocks is kept for the tail of the export even when unaligned.
    assert _status("structured", (n.Extent(MIB - 100, 3),), size=MIB - 100, minimum_block_size=512) == [(MIB - 100, 3)]
    # REQ_ONE: one descriptor, no longer than the request, still whole blocks where it can be.
    assert _status("structured", (n.Extent(1024, 3), n.Extent(512, 0)), 4096, F.REQ_ONE) == [(1024, 3)]
    assert _status("structured", (n.Extent(8192, 3),), 4096, F.REQ_ONE) == [(4096, 3)]
    odd = dict(size=MIB - 100, minimum_block_size=512)
    assert _status("structured", (n.Extent(MIB - 100, 3),), 4096 + 100, F.REQ_ONE, **odd) == [(4096, 3)]
    assert _status("structured", (n.Extent(300, 3),), 300, F.REQ_ONE, size=300) == [(300, 3)]
    # A tail shorter than a block stays whole; one block is one block.
    assert _status("structured", (n.Extent(300, 3),), 300, F.REQ_ONE, size=300, minimum_block_size=512) == [(300, 3)]
    assert _status("structured", (n.Extent(512, 3),), 512, F.REQ_ONE, size=812, minimum_block_size=512) == [(512, 3)]


def test_extents_tiling_the_request_are_all_sent_and_no_more() -> None:
    assert _status("structured", (n.Extent(4095, 0), n.Extent(1, 3), n.Extent(100, 1))) == [(4095, 0), (1, 3)]
    five = tuple(n.Extent(1024, i & 1) for i in range(5))
    assert _status("structured", five, 2048) == [(1024, 0), (1024, 1)]
    assert _status("structured", (n.Extent(4096, 0xFFFFFFFF),)) == [(4096, 0xFFFFFFFF)]  # the largest status


def test_extents_past_the_request_s_end_are_neither_sent_nor_checked() -> None:
    """The application may answer with its whole map: once the request is covered (exactly, here), or the chunk
    holds as many descriptors as it may, the extents after are not looked at, even ones that could not be sent."""
    covering = (n.Extent(1024, 0), n.Extent(1024, 1))
    for bad in (n.Extent(0, 0), n.Extent(512, 1 << 32), n.Extent(700, 0)):
        assert _status("structured", (*covering, bad), 2048, minimum_block_size=512) == [(1024, 0), (1024, 1)]
    full = tuple(n.Extent(1, i & 1) for i in range(4096 // 8))  # as many as a 4096-byte payload holds
    got = _status("structured", (*full, n.Extent(0, 0)), 4096, maximum_payload=4096)
    assert got == [(1, i & 1) for i in range(4096 // 8)]


def test_an_unaligned_extent_may_end_at_the_export_s_end_after_others() -> None:
    got = _status("structured", (n.Extent(512, 0), n.Extent(100, 3)), 612, size=612, minimum_block_size=512)
    assert got == [(512, 0), (100, 3)]


def test_an_extent_longer_than_a_descriptor_is_split() -> None:
    """A compact descriptor holds at most 2^32 - 1 bytes (rounded down to whole blocks); longer extents are
    split, each part with the same status; an extended descriptor takes 64 bits."""
    size = 1 << 34
    got = _status("structured", (n.Extent(size, 3),), 0xFFFFFFFF, size=size)
    assert got == [(0xFFFFFFFF, 3)]
    got = _status("structured", (n.Extent(size, 3),), 0xFFFFFE00, size=size, minimum_block_size=512)
    assert got == [(0xFFFFFE00, 3)]
    s = _in_flight("structured", request(C.BLOCK_STATUS, 2, 0, 0xFFFFFFFF), size=size)
    s.send(n.BlockStatusReply(2, {1: (n.Extent(100, 1), n.Extent(size, 3))}))
    (chunk,) = replies(joined(s))
    assert [(d.length, d.status) for d in chunk.fields.descriptors] == [(100, 1), (0xFFFFFFFF, 3)]
    wide = _status("extended", (n.Extent(size, 3),), 1 << 33, size=size)
    assert wide == [(size, 3)]
    largest = (1 << 64) - 1  # an export as large as NBD_INFO_EXPORT can say, and an extent longer still
    assert _status("extended", (n.Extent(1 << 64, 3),), largest, size=largest, maximum_payload=4096) == [(largest, 3)]


def test_no_more_descriptors_than_the_maximum_payload_holds() -> None:
    many = tuple(n.Extent(1, i & 1) for i in range(600))
    assert len(_status("structured", many, 4096, maximum_payload=4096)) == 4096 // 8
    assert len(_status("extended", many, 4096, maximum_payload=4096)) == 4096 // 16
