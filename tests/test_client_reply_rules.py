"""How a client reads replies (nbdproto.engine._client_replies), on a client fed by hand: every reply it refuses,
with the exact words of its RemoteProtocolError, at the edges of each rule (chunk lengths, offsets, flags),
and refused as soon as the bytes that break the rule arrive, before any payload behind them.
"""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
from tests.test_client_request_rules import transmitting

C, F, T, TF = n.Command, n.CommandFlags, n.ChunkType, n.TransmissionFlags
MIB = 1 << 20
DONE = int(n.ReplyFlags.DONE)


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", n.wire.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, kind: int, payload: bytes, flags: int = DONE, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">IHHQI", n.wire.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, size) + payload


def wide(cookie: int, kind: int, payload: bytes, offset: int, flags: int = DONE) -> bytes:
    return struct.pack(">IHHQQQ", n.wire.EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, len(payload)) + payload


def data(at: int, body: bytes) -> bytes:
    return struct.pack(">Q", at) + body


def hole(at: int, size: int) -> bytes:
    return struct.pack(">QI", at, size)


def error_payload(error: int, message: str, offset: int | None = None) -> bytes:
    text = message.encode()
    tail = b"" if offset is None else struct.pack(">Q", offset)
    return struct.pack(">IH", error, len(text)) + text + tail


def asking(event: object, **kw: object) -> n.ClientConnection:
    client = transmitting(**kw)  # type: ignore[arg-type]
    client.send(event)  # type: ignore[arg-type]
    client.data_to_send()
    return client


def refused(client: n.ClientConnection, received: bytes, eof: bool = False) -> str:
    """The words of the RemoteProtocolError ``received`` (then the end of the stream, with ``eof``) causes."""
    with pytest.raises(n.RemoteProtocolError) as broken:
        client.receive_data(received)
        if eof:
            client.receive_data(b"")
        while client.next_event() is not n.NEED_DATA:
            pass
    return str(broken.value)


def answers(client: n.ClientConnection, received: bytes) -> list[object]:
    client.receive_data(received)
    out = []
    while (event := client.next_event()) is not n.NEED_DATA:
        out.append(event)
    return out


# --- The reply's frame -----------------------------------------------------------------------------------------


def test_a_reply_magic_that_is_none_is_refused_on_its_four_bytes() -> None:
    client = asking(n.FlushRequest(1))
    assert refused(client, b"\xde\xad\xbe\xef") == "reply magic 0xdeadbeef is not a reply magic"


def test_the_server_closing_mid_reply_in_words() -> None:
    assert refused(asking(n.FlushRequest(1)), simple(1)[:4], eof=True) == (
        "the server closed the connection in the middle of a reply"
    )
    assert refused(asking(n.FlushRequest(1)), simple(1)[:3], eof=True) == (
        "the server closed the connection in the middle of a reply (3 bytes)"
    )
    client = asking(n.ReadRequest(7, 0, 1024), simple=True)
    assert (
        refused(client, simple(7) + bytes(100), eof=True) == "the server closed the connection in the middle of a reply"
    )


def test_a_reply_for_a_cookie_not_in_flight() -> None:
    assert refused(asking(n.FlushRequest(1)), simple(2)) == "reply for cookie 0x2, which is not in flight"


@pytest.mark.parametrize("kw", [{"simple": True}, {}])
def test_a_simple_reply_where_the_reply_form_forbids_it(kw: dict[str, bool]) -> None:
    assert refused(asking(n.FlushRequest(1), extended=True), simple(1)) == (
        "a simple reply after extended headers were negotiated"
    )
    if not kw:
        assert refused(asking(n.ReadRequest(3, 0, 512)), simple(3)) == (
            "simple reply with data to read 0x3 while structured replies are in use"
        )


def test_a_chunk_where_the_reply_form_forbids_it() -> None:
    assert refused(asking(n.FlushRequest(1), simple=True), chunk(1, T.NONE, b"")) == (
        "StructuredReplyHeader chunk, but the negotiated reply form does not allow it"
    )
    assert refused(asking(n.FlushRequest(1)), wide(1, T.NONE, b"", 0)) == (
        "ExtendedReplyHeader chunk, but the negotiated reply form does not allow it"
    )
    assert refused(asking(n.FlushRequest(1), extended=True), chunk(1, T.NONE, b"")) == (
        "StructuredReplyHeader chunk, but the negotiated reply form does not allow it"
    )


def test_an_extended_reply_echoes_the_request_s_offset() -> None:
    client = asking(n.ReadRequest(1, 4096, 512), extended=True)
    assert refused(client, wide(1, T.OFFSET_DATA, data(4096, bytes(512)), 0)) == (
        "extended reply offset 0 does not echo the request's 4096"
    )
    client = asking(n.ReadRequest(1, 4096, 512), extended=True)
    (reply,) = answers(client, wide(1, T.OFFSET_DATA, data(4096, b"\x07" * 512), 4096))
    assert bytes(reply.data) == b"\x07" * 512


def test_block_status_answered_by_a_simple_success() -> None:
    client = asking(n.BlockStatusRequest(4, 0, 4096), contexts=(n.BASE_ALLOCATION,))
    assert refused(client, simple(4)) == "block status 0x4 answered by a simple reply without error"


# --- Chunk types and lengths against the request -------------------------------------------------------------


def test_read_chunks_of_every_allowed_length() -> None:
    for size in (1, 512):
        client = asking(n.ReadRequest(1, 0, size))
        (reply,) = answers(client, chunk(1, T.OFFSET_DATA, data(0, b"\x05" * size)))
        assert bytes(reply.data) == b"\x05" * size
    client = asking(n.ReadRequest(1, 0, 1))
    (reply,) = answers(client, chunk(1, T.OFFSET_HOLE, hole(0, 1)))  # a hole on a one-byte read
    assert bytes(reply.data) == b"\0"


@pytest.mark.parametrize("length", [8, 0, 512 + 9, 512 + 100])
def test_an_offset_data_chunk_of_a_length_no_read_allows(length: int) -> None:
    client = asking(n.ReadRequest(1, 0, 512))
    header = chunk(1, T.OFFSET_DATA, b"", length=length)
    assert refused(client, header) == (
        f"OFFSET_DATA chunk of {length} bytes for READ 0x1: it carries 1 to 512 bytes of data after its offset"
    )


@pytest.mark.parametrize("length", [11, 13, 0])
def test_an_offset_hole_chunk_is_always_12_bytes(length: int) -> None:
    client = asking(n.ReadRequest(1, 0, 4096))
    assert refused(client, chunk(1, T.OFFSET_HOLE, b"", length=length)) == (
        f"OFFSET_HOLE chunk of {length} bytes for READ 0x1: it is always 12"
    )


def test_a_hole_of_nothing_is_refused_and_of_one_byte_taken() -> None:
    client = asking(n.ReadRequest(1, 0, 2))
    assert refused(client, chunk(1, T.OFFSET_HOLE, hole(0, 0))) == "OFFSET_HOLE chunk with a hole of 0 bytes"
    client = asking(n.ReadRequest(1, 0, 2))
    (reply,) = answers(client, chunk(1, T.OFFSET_HOLE, hole(0, 1), flags=0) + chunk(1, T.OFFSET_DATA, data(1, b"x")))
    assert bytes(reply.data) == b"\0x"


@pytest.mark.parametrize("kind", [T.OFFSET_DATA, T.OFFSET_HOLE])
def test_read_data_for_what_is_not_a_read(kind: int) -> None:
    client = asking(n.FlushRequest(6))
    payload = data(0, b"x") if kind == T.OFFSET_DATA else hole(0, 1)
    assert refused(client, chunk(6, kind, payload)) == "read data for FLUSH 0x6"


def test_block_status_for_what_is_not_block_status_and_in_the_wrong_form() -> None:
    client = asking(n.ReadRequest(2, 0, 512))
    assert refused(client, chunk(2, T.BLOCK_STATUS, struct.pack(">III", 1, 512, 0))) == (
        "block status chunk for READ 0x2"
    )
    client = asking(n.BlockStatusRequest(3, 0, 512), contexts=(n.BASE_ALLOCATION,))
    ext = struct.pack(">IIQQ", 1, 1, 512, 0)
    assert refused(client, chunk(3, T.BLOCK_STATUS_EXT, ext)) == (
        "BLOCK_STATUS_EXT chunk does not match the negotiated headers"
    )
    client = asking(n.BlockStatusRequest(3, 0, 512), contexts=(n.BASE_ALLOCATION,), extended=True)
    compact = struct.pack(">III", 1, 512, 0)
    assert (
        refused(client, wide(3, T.BLOCK_STATUS, compact, 0))
        == "BLOCK_STATUS chunk does not match the negotiated headers"
    )


def test_req_one_allows_one_descriptor_counted_from_the_header() -> None:
    client = asking(n.BlockStatusRequest(3, 0, 4096, F.REQ_ONE), contexts=(n.BASE_ALLOCATION,))
    two = chunk(3, T.BLOCK_STATUS, struct.pack(">IIIII", 1, 512, 0, 512, 3))
    assert (
        refused(client, two[:20])
        == "BLOCK_STATUS chunk of 2 descriptors answers a REQ_ONE request (exactly one allowed)"
    )


@pytest.mark.parametrize("flags", [0, DONE])
def test_a_none_chunk_is_empty_and_carries_done(flags: int) -> None:
    client = asking(n.FlushRequest(5))
    length = 4 if flags else 0  # with DONE: a payload; without: none, but no DONE either
    assert refused(client, chunk(5, T.NONE, b"", flags, length=length)) == (
        f"NONE chunk for FLUSH 0x5 with {length} bytes of payload, flags {flags:#x}: it must be empty and carry DONE"
    )


def test_an_unknown_chunk_type() -> None:
    assert refused(asking(n.FlushRequest(5)), chunk(5, 77, b"")) == "unknown chunk type 77 for FLUSH 0x5"


# --- Error chunks ----------------------------------------------------------------------------------------------


def test_error_chunks_up_to_64_kib() -> None:
    client = asking(n.FlushRequest(1))
    assert refused(client, chunk(1, T.ERROR, b"", length=65537)) == (
        "error chunk of 65537 bytes for FLUSH 0x1 exceeds 65536 bytes"
    )
    client = asking(n.FlushRequest(1))
    message = "m" * (65536 - 6)
    (reply,) = answers(client, chunk(1, T.ERROR, error_payload(n.Errno.EIO, message)))
    assert reply == n.ErrorReply(1, n.Errno.EIO, message)


def test_error_offsets_inside_the_request() -> None:
    client = asking(n.ReadRequest(1, 4096, 512))
    (reply,) = answers(client, chunk(1, T.ERROR_OFFSET, error_payload(n.Errno.EIO, "bad", 4096 + 511)))
    assert reply == n.ErrorReply(1, n.Errno.EIO, "bad", 4607)
    client = asking(n.ReadRequest(1, 4096, 512))
    assert refused(client, chunk(1, T.ERROR_OFFSET, error_payload(n.Errno.EIO, "bad", 4608))) == (
        "error offset 4608 is outside the request 4096+512"
    )


# --- The chunks of a read ------------------------------------------------------------------------------------


def test_a_chunk_s_offset_is_checked_as_soon_as_it_arrives() -> None:
    """Before any of the data behind it: the header and the 8-byte offset are enough."""
    client = asking(n.ReadRequest(1, 4096, 4096))
    header_and_offset = chunk(1, T.OFFSET_DATA, data(8192, b""), length=8 + 1024)
    assert refused(client, header_and_offset) == "read chunk 8192+1024 is outside the request 4096+4096"


def test_a_df_read_takes_one_chunk() -> None:
    client = asking(n.ReadRequest(1, 0, 1024, F.DF), flags=EVERYTHING_DF)
    assert refused(client, chunk(1, T.OFFSET_DATA, data(0, bytes(512)), flags=0)) == (
        "a DF read answered in more than one chunk"
    )
    client = asking(n.ReadRequest(1, 0, 1024, F.DF), flags=EVERYTHING_DF)
    assert (
        refused(client, chunk(1, T.OFFSET_DATA, data(512, bytes(512)))) == "a DF read answered in more than one chunk"
    )
    client = asking(n.ReadRequest(1, 0, 1024, F.DF), flags=EVERYTHING_DF)
    (reply,) = answers(client, chunk(1, T.OFFSET_HOLE, hole(0, 1024)))
    assert bytes(reply.data) == bytes(1024)


EVERYTHING_DF = int(TF.HAS_FLAGS | TF.SEND_DF | TF.SEND_FLUSH)


def test_a_read_ended_before_all_of_it_was_answered() -> None:
    client = asking(n.ReadRequest(1, 0, 1))
    assert refused(client, chunk(1, T.NONE, b"")) == "read 0x1 ended with 0 of 1 bytes answered"
    client = asking(n.ReadRequest(0x11, 0, 1024))
    assert refused(client, chunk(0x11, T.OFFSET_DATA, data(0, bytes(512)), flags=0), eof=True) == (
        "the server closed the connection before the DONE chunk of cookie 0x11"
    )


# --- Error chunks, their fields ------------------------------------------------------------------------------

UNKNOWN_ERROR_CHUNK = 0x8000 + 100


def test_an_error_chunk_of_an_unknown_type_takes_its_error_and_message() -> None:
    client = asking(n.FlushRequest(1))
    (reply,) = answers(client, chunk(1, UNKNOWN_ERROR_CHUNK, struct.pack(">IH", n.Errno.EIO, 0)))  # 6 bytes: enough
    assert reply == n.ErrorReply(1, n.Errno.EIO, "")
    client = asking(n.FlushRequest(1))
    assert refused(client, chunk(1, UNKNOWN_ERROR_CHUNK, struct.pack(">IH", n.Errno.EIO, 0)[:5])) == (
        "error chunk type 32868 of 5 bytes"
    )
    client = asking(n.FlushRequest(1))
    (reply,) = answers(client, chunk(1, UNKNOWN_ERROR_CHUNK, struct.pack(">IH", n.Errno.EIO, 3) + b"a\xffb"))
    assert reply == n.ErrorReply(1, n.Errno.EIO, "a\ufffdb")  # not UTF-8: the bad byte replaced, not refused


def test_an_error_chunk_with_error_0() -> None:
    assert refused(asking(n.FlushRequest(1)), chunk(1, T.ERROR, error_payload(0, "fine"))) == (
        "an error chunk with error 0"
    )


def test_an_error_offset_for_a_request_of_no_length_is_its_offset() -> None:
    client = asking(n.FlushRequest(1))
    (reply,) = answers(client, chunk(1, T.ERROR_OFFSET, error_payload(n.Errno.EIO, "bad", 0)))
    assert reply == n.ErrorReply(1, n.Errno.EIO, "bad", 0)
    client = asking(n.FlushRequest(1))
    assert refused(client, chunk(1, T.ERROR_OFFSET, error_payload(n.Errno.EIO, "bad", 1))) == (
        "error offset 1 is outside the request 0+0"
    )


# --- Block status chunks ---------------------------------------------------------------------------------------


def extents(context: int, *pairs: tuple[int, int]) -> bytes:
    return struct.pack(">I", context) + b"".join(struct.pack(">II", length, flags) for length, flags in pairs)


def test_block_status_answers_each_context_asked_for_once() -> None:
    client = asking(n.BlockStatusRequest(3, 0, 4096), contexts=(n.BASE_ALLOCATION,))
    twice = chunk(3, T.BLOCK_STATUS, extents(1, (4096, 0)), flags=0) + chunk(3, T.BLOCK_STATUS, extents(1, (4096, 0)))
    assert refused(client, twice) == "block status for context 1, not asked for or answered twice"
    client = asking(n.BlockStatusRequest(3, 0, 4096), contexts=(n.BASE_ALLOCATION,))
    assert refused(client, chunk(3, T.BLOCK_STATUS, extents(5, (4096, 0)))) == (
        "block status for context 5, not asked for or answered twice"
    )
    client = asking(n.BlockStatusRequest(3, 0, 4096), contexts=(n.BASE_ALLOCATION, "x:y"))
    assert refused(client, chunk(3, T.BLOCK_STATUS, extents(2, (4096, 0)))) == (
        "block status 0x3 answered contexts [2] of [1, 2]"
    )
    client = asking(n.BlockStatusRequest(3, 0, 4096), contexts=(n.BASE_ALLOCATION, "x:y"))
    both = chunk(3, T.BLOCK_STATUS, extents(2, (4096, 1)), flags=0) + chunk(3, T.BLOCK_STATUS, extents(1, (512, 0)))
    (reply,) = answers(client, both)
    assert reply == n.BlockStatusReply(3, {1: (n.Extent(512, 0),), 2: (n.Extent(4096, 1),)})


def test_req_one_holds_the_one_extent_to_the_request() -> None:
    client = asking(n.BlockStatusRequest(3, 0, 512, F.REQ_ONE), contexts=(n.BASE_ALLOCATION,))
    assert refused(client, chunk(3, T.BLOCK_STATUS, extents(1, (1024, 0)))) == (
        "the REQ_ONE extent of context 1 is 1024 bytes, longer than the 512 requested"
    )
    client = asking(n.BlockStatusRequest(3, 0, 512), contexts=(n.BASE_ALLOCATION,))
    (reply,) = answers(client, chunk(3, T.BLOCK_STATUS, extents(1, (1024, 0))))  # without REQ_ONE it may go on
    assert reply == n.BlockStatusReply(3, {1: (n.Extent(1024, 0),)})
