"""What a client refuses to send, and the bytes it sends (nbdproto.engine._client_requests), on a client fed
its server's answers by hand: each refusal with its exact words, the request headers byte for byte, the
defaults a new connection starts with, and how it takes the server's end.
"""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
from tests.test_client_rules import greeted, option_reply, sent

OPT, R, TF, F, C = n.Option, n.OptionReplyType, n.TransmissionFlags, n.CommandFlags, n.Command
MIB = 1 << 20
EVERYTHING = int(
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE | TF.SEND_RESIZE
)


def transmitting(
    *,
    extended: bool = False,
    contexts: tuple[str, ...] = (),
    flags: int = EVERYTHING,
    size: int = MIB,
    simple: bool = False,
    block_sizes: tuple[int, int, int] | None = None,
) -> n.ClientConnection:
    """A client taken to transmission by hand: structured replies (or extended headers, or neither if
    ``simple``), the meta contexts (ids 1, 2, ...), and an export of ``size`` bytes with transmission ``flags``
    (and ``block_sizes``, asked for, if given)."""
    client = greeted()
    if not simple:
        client.send(n.OptionExtendedHeaders() if extended else n.OptionStructuredReply())
        client.receive_data(option_reply(OPT.EXTENDED_HEADERS if extended else OPT.STRUCTURED_REPLY, R.ACK))
        client.next_event()
    if contexts:
        client.send(n.OptionSetMetaContext("", contexts))
        replies = b"".join(
            option_reply(OPT.SET_META_CONTEXT, R.META_CONTEXT, struct.pack(">I", i + 1) + name.encode())
            for i, name in enumerate(contexts)
        )
        client.receive_data(replies + option_reply(OPT.SET_META_CONTEXT, R.ACK))
        client.next_event()
    client.send(n.OptionGo("", (n.InfoType.BLOCK_SIZE,) if block_sizes else ()))
    info = option_reply(OPT.GO, R.INFO, struct.pack(">HQH", n.InfoType.EXPORT, size, flags))
    if block_sizes:
        info += option_reply(OPT.GO, R.INFO, struct.pack(">HIII", n.InfoType.BLOCK_SIZE, *block_sizes))
    client.receive_data(info + option_reply(OPT.GO, R.ACK))
    assert isinstance(client.next_event(), n.HandshakeComplete)
    sent(client)
    return client


def refusal(client: n.ClientConnection, event: object) -> n.LocalProtocolError:
    with pytest.raises(n.LocalProtocolError) as refused:
        client.send(event)  # type: ignore[arg-type]
    assert sent(client) == b""  # nothing of a refused request goes out
    return refused.value


def test_a_new_connection_starts_lenient_idle_and_not_shutting_down() -> None:
    client = n.ClientConnection()
    assert client.strict is False
    assert client.server_shutting_down is False
    assert client.in_flight == 0 and not client.must_disconnect


def test_a_refused_request_says_why_with_the_error_a_server_would_give() -> None:
    client = transmitting(flags=int(TF.HAS_FLAGS | TF.READ_ONLY))
    refused = refusal(client, n.WriteRequest(1, 0, b"x" * 512))
    assert (str(refused), refused.error_code) == ("WRITE on a read-only export", n.Errno.EPERM)
    refused = refusal(client, n.ReadRequest(2, MIB, 512))
    assert (str(refused), refused.error_code) == (
        f"offset {MIB} + length 512 is past the export size {MIB}",
        n.Errno.EINVAL,
    )


def test_what_is_not_a_request_is_refused() -> None:
    client = transmitting()
    assert str(refusal(client, n.SuccessReply(1))) == "SuccessReply cannot be sent in transmission: it is not a request"


def test_a_cookie_in_flight_cannot_be_used_again() -> None:
    client = transmitting()
    client.send(n.ReadRequest(0x2A, 0, 512))
    sent(client)
    assert str(refusal(client, n.FlushRequest(0x2A))) == "cookie 0x2a is still in flight"


def test_payload_len_is_the_connection_s_flag() -> None:
    client = transmitting(extended=True)
    assert str(refusal(client, n.ReadRequest(1, 0, 512, F.PAYLOAD_LEN))) == (
        "NBD_CMD_FLAG_PAYLOAD_LEN is the connection's to set, not the caller's"
    )


def test_nothing_follows_a_disconnect() -> None:
    client = transmitting()
    client.send(n.DisconnectRequest(9))
    assert sent(client) == struct.pack(">IHHQQI", n.wire.REQUEST_MAGIC, 0, C.DISC, 9, 0, 0)
    assert str(refusal(client, n.FlushRequest(1))) == "no request may follow NBD_CMD_DISC"


def test_after_eshutdown_only_a_disconnect() -> None:
    client = transmitting()
    client.send(n.FlushRequest(1))
    sent(client)
    client.receive_data(struct.pack(">IIQ", n.wire.SIMPLE_REPLY_MAGIC, n.Errno.ESHUTDOWN, 1))
    assert isinstance(client.next_event(), n.ErrorReply)
    assert client.server_shutting_down and client.must_disconnect
    assert str(refusal(client, n.FlushRequest(2))) == (
        "the server is shutting down (NBD_ESHUTDOWN): only NBD_CMD_DISC may follow"
    )
    client.send(n.DisconnectRequest(3))
    assert not client.must_disconnect


def test_a_length_beyond_32_bits_needs_extended_headers() -> None:
    size = 1 << 40
    client = transmitting(size=size)
    client.send(n.TrimRequest(1, 0, 0xFFFFFFFF))  # the largest a compact header holds
    assert sent(client) == struct.pack(">IHHQQI", n.wire.REQUEST_MAGIC, 0, C.TRIM, 1, 0, 0xFFFFFFFF)
    assert str(refusal(client, n.TrimRequest(2, 0, 1 << 32))) == f"length {1 << 32} needs extended headers"
    wide = transmitting(extended=True, size=size)
    wide.send(n.TrimRequest(2, 0, 1 << 32))
    assert sent(wide) == struct.pack(">IHHQQQ", n.wire.EXTENDED_REQUEST_MAGIC, 0, C.TRIM, 2, 0, 1 << 32)


@pytest.mark.parametrize(("buffer", "length"), [(bytearray(100), 512), (bytes(512), 512), (bytearray(600), 512)])
def test_a_read_buffer_must_be_writable_and_fit(buffer: bytes | bytearray, length: int) -> None:
    client = transmitting()
    assert str(refusal(client, n.ReadRequest(1, 0, length, buffer=buffer))) == (
        f"read buffer must be writable and {length} bytes long"
    )


@pytest.mark.parametrize("extended", [False, True])
def test_request_headers_byte_for_byte(extended: bool) -> None:
    """Each request's header as the spec lays it out; a write's data after it, with PAYLOAD_LEN only under
    extended headers; RESIZE's new size in the offset field and a length of 0."""
    client = transmitting(extended=extended)
    magic, wide = (n.wire.EXTENDED_REQUEST_MAGIC, "Q") if extended else (n.wire.REQUEST_MAGIC, "I")

    def header(flags: int, command: int, cookie: int, offset: int, length: int) -> bytes:
        return struct.pack(f">IHHQQ{wide}", magic, flags, command, cookie, offset, length)

    payload_len = int(F.PAYLOAD_LEN) if extended else 0
    cases = [
        (n.ReadRequest(1, 4096, 512), header(0, C.READ, 1, 4096, 512)),
        (n.WriteRequest(2, 512, b"abc", F.FUA), header(F.FUA | payload_len, C.WRITE, 2, 512, 3) + b"abc"),
        (n.WriteRequest(3, 0, b"d"), header(payload_len, C.WRITE, 3, 0, 1) + b"d"),
        (n.FlushRequest(4), header(0, C.FLUSH, 4, 0, 0)),
        (n.TrimRequest(5, 0, 4096, F.FUA), header(F.FUA, C.TRIM, 5, 0, 4096)),
        (n.CacheRequest(6, 0, 4096), header(0, C.CACHE, 6, 0, 4096)),
        (n.WriteZeroesRequest(7, 0, 4096, F.NO_HOLE), header(F.NO_HOLE, C.WRITE_ZEROES, 7, 0, 4096)),
        (n.ResizeRequest(8, 2 * MIB), header(0, C.RESIZE, 8, 2 * MIB, 0)),
    ]
    for event, expected in cases:
        client.send(event)
        assert sent(client) == expected, event


def test_choosing_contexts_needs_the_flag_for_it() -> None:
    contexts = (n.BASE_ALLOCATION, "x:y")
    without = transmitting(extended=True, contexts=contexts)
    assert without.can_choose_contexts is False
    assert str(refusal(without, n.BlockStatusRequest(1, 0, 4096, n.NO_FLAGS, (2,)))) == (
        "choosing contexts per request needs NBD_FLAG_BLOCK_STATUS_PAYLOAD"
    )
    without.send(n.BlockStatusRequest(2, 0, 4096, n.NO_FLAGS, (1, 2)))  # all of them: the compact form
    assert len(sent(without)) == 32
    chooser = transmitting(extended=True, contexts=contexts, flags=EVERYTHING | TF.BLOCK_STATUS_PAYLOAD)
    assert chooser.can_choose_contexts is True
    chooser.send(n.BlockStatusRequest(3, 0, 4096, n.NO_FLAGS, (2,)))
    assert sent(chooser) == struct.pack(
        ">IHHQQQQI", n.wire.EXTENDED_REQUEST_MAGIC, F.PAYLOAD_LEN, C.BLOCK_STATUS, 3, 0, 12, 4096, 2
    )
    compact = transmitting(contexts=contexts, flags=EVERYTHING | TF.BLOCK_STATUS_PAYLOAD)
    assert compact.can_choose_contexts is False  # the flag without extended headers
    assert n.ClientConnection().can_choose_contexts is False  # no export yet


@pytest.mark.parametrize("ids", [(3,), (1, 1), (0,)])
def test_contexts_chosen_must_be_agreed_and_distinct(ids: tuple[int, ...]) -> None:
    client = transmitting(
        extended=True, contexts=(n.BASE_ALLOCATION, "x:y"), flags=EVERYTHING | TF.BLOCK_STATUS_PAYLOAD
    )
    assert str(refusal(client, n.BlockStatusRequest(1, 0, 4096, n.NO_FLAGS, ids))) == (
        f"context ids {list(ids)} are repeated or were not agreed"
    )


def test_the_server_closing_with_requests_unanswered_is_a_close_and_not_a_broken_reply() -> None:
    """A request no chunk of which arrived is simply left without an answer (the driver fails it); one whose
    reply had begun is a reply cut short."""
    client = transmitting()
    client.send(n.ReadRequest(1, 0, 512))
    client.receive_data(b"")
    assert isinstance(client.next_event(), n.ConnectionClosed)
    begun = transmitting()
    begun.send(n.ReadRequest(0x11, 0, 1024))
    chunk = struct.pack(">IHHQIQ", n.wire.STRUCTURED_REPLY_MAGIC, 0, n.ChunkType.OFFSET_DATA, 0x11, 8 + 512, 0)
    begun.receive_data(chunk + bytes(512))
    assert begun.next_event() is n.NEED_DATA
    begun.receive_data(b"")
    with pytest.raises(n.RemoteProtocolError) as broken:
        begun.next_event()
    assert str(broken.value) == "the server closed the connection before the DONE chunk of cookie 0x11"


def test_plaintext_after_starttls_names_the_server() -> None:
    client = greeted()
    client.send(n.OptionStartTLS())
    client.receive_data(option_reply(OPT.STARTTLS, R.ACK))
    assert isinstance(client.next_event(), n.StartTLS)
    with pytest.raises(n.RemoteProtocolError) as broken:
        client.receive_data(b"\x00")
    assert str(broken.value) == "the server sent plaintext after NBD_OPT_STARTTLS was acknowledged, before TLS"
