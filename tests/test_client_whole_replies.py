"""Whole replies that arrive together (nbdproto.engine._client_replies, ``_queue_whole_replies``): a client
takes every whole reply to a plain READ, and every simple reply without error to a request other than READ and
BLOCK_STATUS, in one received chunk in one loop, and leaves anything else to the full checks. These are the
replies that loop must not take: each looks like one it takes in all but one field, and the client answers it
as the full checks do (the same event, or the same refusal in the same words), whatever comes before or after
it in the chunk. Each test runs twice: as a client is, and with its
short roads turned off (``_fast_paths``), which gives the same answers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

import nbdproto as n
from tests.test_client_reply_rules import answers, asking, chunk, data, hole, refused, simple

T = n.ChunkType
Ask = Callable[..., n.ClientConnection]


@pytest.fixture(params=[True, False], ids=["fast-paths", "full-checks"])
def ask(request: pytest.FixtureRequest) -> Ask:
    """``asking``, on a client with its short roads on or off."""

    def make(event: object, **kw: object) -> n.ClientConnection:
        client = asking(event, **kw)
        client._fast_paths = request.param  # type: ignore[attr-defined]
        return client

    return make


def test_a_reply_magic_that_is_none_is_refused_though_the_rest_is_a_whole_read_reply(ask: Ask) -> None:
    bad = b"\xde\xad\xbe\xef"
    structured = ask(n.ReadRequest(1, 0, 16))
    assert refused(structured, bad + chunk(1, T.OFFSET_DATA, data(0, bytes(16)))[4:]) == (
        "reply magic 0xdeadbeef is not a reply magic"
    )
    plain = ask(n.ReadRequest(1, 0, 16), simple=True)
    assert refused(plain, bad + simple(1)[4:] + bytes(16)) == "reply magic 0xdeadbeef is not a reply magic"


def test_a_simple_reply_with_data_for_a_cookie_not_in_flight(ask: Ask) -> None:
    client = ask(n.ReadRequest(7, 0, 16), simple=True)
    assert refused(client, simple(8) + bytes(16)) == "reply for cookie 0x8, which is not in flight"


def test_a_whole_read_in_a_chunk_without_done_waits_for_the_done_chunk(ask: Ask) -> None:
    client = ask(n.ReadRequest(1, 0, 16))
    received = chunk(1, T.OFFSET_DATA, data(0, b"\x03" * 16), flags=0) + chunk(1, T.NONE, b"")
    (reply,) = answers(client, received)
    assert isinstance(reply, n.ReadReply) and bytes(reply.data) == b"\x03" * 16
    assert client.in_flight == 0


def test_a_hole_the_size_of_a_data_chunk_reads_as_zeroes(ask: Ask) -> None:
    """An OFFSET_HOLE chunk of a 4-byte read is 12 bytes, as an OFFSET_DATA chunk of it is: its 4 bytes after the
    offset are the hole's size, not data."""
    client = ask(n.ReadRequest(1, 0, 4))
    (reply,) = answers(client, chunk(1, T.OFFSET_HOLE, hole(0, 4)))
    assert bytes(reply.data) == bytes(4)


def test_read_data_for_a_write_of_the_same_length(ask: Ask) -> None:
    client = ask(n.WriteRequest(1, 0, bytes(512)))
    assert refused(client, chunk(1, T.OFFSET_DATA, data(0, bytes(512)))) == "read data for WRITE 0x1"


def test_a_done_chunk_with_a_byte_more_than_the_read(ask: Ask) -> None:
    client = ask(n.ReadRequest(1, 0, 512))
    assert refused(client, chunk(1, T.OFFSET_DATA, data(0, bytes(513)))) == (
        "OFFSET_DATA chunk of 521 bytes for READ 0x1: it carries 1 to 512 bytes of data after its offset"
    )


def test_a_done_chunk_with_half_the_read_followed_by_more_bytes(ask: Ask) -> None:
    client = ask(n.ReadRequest(1, 0, 32))
    received = chunk(1, T.OFFSET_DATA, data(0, bytes(16))) + simple(2) + bytes(4)
    assert refused(client, received) == "read 0x1 ended with 16 of 32 bytes answered"


def test_replies_around_whole_read_replies_keep_their_place(ask: Ask) -> None:
    """A reply the loop does not take, before and after the ones it takes: every one answered, in order."""
    client = ask(n.WriteRequest(1, 0, bytes(512)), simple=True)
    client.send(n.ReadRequest(2, 0, 8))
    client.send(n.ReadRequest(3, 8, 8))
    client.send(n.FlushRequest(4))
    client.data_to_send()
    received = simple(1) + simple(2) + b"\x02" * 8 + simple(3) + b"\x03" * 8 + simple(4)
    got = answers(client, received)
    assert [type(event) for event in got] == [n.SuccessReply, n.ReadReply, n.ReadReply, n.SuccessReply]
    assert [event.cookie for event in got] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert bytes(got[1].data) == b"\x02" * 8 and bytes(got[2].data) == b"\x03" * 8  # type: ignore[attr-defined]
    assert client.in_flight == 0


def test_a_structured_whole_read_after_a_reply_the_loop_leaves(ask: Ask) -> None:
    client = ask(n.FlushRequest(1))
    client.send(n.ReadRequest(2, 0, 8))
    client.send(n.FlushRequest(3))
    client.data_to_send()
    received = chunk(1, T.NONE, b"") + chunk(2, T.OFFSET_DATA, data(0, b"\x02" * 8)) + chunk(3, T.NONE, b"")
    got = answers(client, received)
    assert [(type(event), event.cookie) for event in got] == [  # type: ignore[attr-defined]
        (n.SuccessReply, 1),
        (n.ReadReply, 2),
        (n.SuccessReply, 3),
    ]
    assert bytes(got[1].data) == b"\x02" * 8  # type: ignore[attr-defined]


def test_a_simple_reply_whose_data_came_in_a_second_piece_is_answered_at_once(ask: Ask) -> None:
    """All of its data is there when the header is read, though not in the piece the header came in: the reply
    is complete, not a read still waiting for bytes."""
    client = ask(n.ReadRequest(1, 0, 16), simple=True)
    client.receive_data(simple(1) + b"\x01" * 8)
    (reply,) = answers(client, b"\x02" * 8)
    assert isinstance(reply, n.ReadReply) and bytes(reply.data) == b"\x01" * 8 + b"\x02" * 8


@pytest.mark.parametrize("form", ["simple", "structured"])
def test_simple_success_replies_to_writes_flushes_and_trims_between_reads(ask: Ask, form: str) -> None:
    """With or without structured replies, a write's, a flush's and a trim's simple replies without error are
    their SuccessReply, in order with the reads around them."""
    plain = form == "simple"
    client = ask(n.WriteRequest(1, 0, bytes(512)), simple=plain)
    client.send(n.ReadRequest(2, 0, 8))
    client.send(n.FlushRequest(3))
    client.send(n.TrimRequest(4, 0, 512))
    client.data_to_send()
    read = simple(2) + b"\x02" * 8 if plain else chunk(2, T.OFFSET_DATA, data(0, b"\x02" * 8))
    got = answers(client, simple(1) + read + simple(3) + simple(4))
    assert [(type(event), event.cookie) for event in got] == [  # type: ignore[attr-defined]
        (n.SuccessReply, 1),
        (n.ReadReply, 2),
        (n.SuccessReply, 3),
        (n.SuccessReply, 4),
    ]
    assert client.in_flight == 0


def test_a_simple_error_reply_to_a_write_is_its_error(ask: Ask) -> None:
    client = ask(n.WriteRequest(1, 0, bytes(512)))
    client.send(n.WriteRequest(2, 512, bytes(512)))
    client.data_to_send()
    got = answers(client, simple(1) + simple(2, int(n.Errno.ENOSPC)))
    assert [type(event) for event in got] == [n.SuccessReply, n.ErrorReply]
    assert got[1].error == n.Errno.ENOSPC  # type: ignore[attr-defined]


def test_a_simple_reply_without_error_to_block_status_is_refused(ask: Ask) -> None:
    client = ask(n.WriteRequest(1, 0, bytes(512)), contexts=("base:allocation",))
    client.send(n.BlockStatusRequest(2, 0, 512))
    client.data_to_send()
    assert refused(client, simple(1) + simple(2)) == "block status 0x2 answered by a simple reply without error"


def test_a_simple_reply_to_a_write_not_in_flight_is_refused(ask: Ask) -> None:
    client = ask(n.WriteRequest(1, 0, bytes(512)))
    assert refused(client, simple(1) + simple(1)) == "reply for cookie 0x1, which is not in flight"


def test_a_simple_reply_with_extended_headers_is_refused(ask: Ask) -> None:
    client = ask(n.WriteRequest(1, 0, bytes(512)), extended=True)
    assert refused(client, simple(1)) == "a simple reply after extended headers were negotiated"


def test_a_simple_reply_to_a_write_whose_chunks_began_is_refused(ask: Ask) -> None:
    """An error chunk without DONE, then a simple reply without error for the same write: not a success (the
    error would be lost), a server error."""
    client = ask(n.WriteRequest(1, 0, bytes(512)))
    message = struct.pack(">IH", int(n.Errno.EIO), 0)
    assert refused(client, chunk(1, T.ERROR, message, flags=0) + simple(1)) == (
        "a simple reply to WRITE 0x1, whose structured reply had begun"
    )
