"""How the server engine answers each option it refuses (nbdproto.engine._server_handshake), with the reply
type the spec names and the exact words of its message; the options that end the session with the words of
their RemoteProtocolError; and the application's answers it refuses to send (LocalProtocolError).
tests/test_server.py and tests/test_options.py cover what each option does when it succeeds.
"""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
from nbdproto.engine._server import ServerConnection
from nbdproto.wire import layout as w
from tests.nbdbytes import client_flags, info_payload, joined, meta_payload, option, option_replies
from tests.test_server import events, export, new_server

OPT, R, TF = n.Option, n.OptionReplyType, n.TransmissionFlags
MIB = 1 << 20


def haggling(*, fixed: bool = True, structured: bool = False, **kw: object) -> ServerConnection:
    """A server past the client flags, with structured replies agreed if ``structured``."""
    s = new_server(**kw)
    s.receive_data(client_flags(3 if fixed else 2))
    if structured:
        s.receive_data(option(OPT.STRUCTURED_REPLY))
    assert events(s) == []
    joined(s)
    return s


def answered(s: ServerConnection, data: bytes) -> list[tuple[int, int, str]]:
    """Feed ``data``; every option reply it caused as (option, reply type, message or payload)."""
    s.receive_data(data)
    assert events(s) == []
    out = []
    for reply in option_replies(joined(s)):
        text = w.decode(w.ErrorReplyPayload, reply.data).message if reply.reply_type & (1 << 31) else reply.data.hex()
        out.append((reply.option, reply.reply_type, text))
    return out


def broken(s: ServerConnection, data: bytes) -> str:
    s.receive_data(data)
    with pytest.raises(n.RemoteProtocolError) as failure:
        events(s)
    assert s.phase is n.Phase.ERROR
    return str(failure.value)


@pytest.mark.parametrize(
    ("setup", "data", "reply"),
    [
        ({}, option(99), (99, R.ERR_UNSUP, "option 99 is not supported")),
        ({"tls": n.TlsMode.NOTLS}, option(OPT.STARTTLS),
         (OPT.STARTTLS, R.ERR_POLICY, "this server does not offer TLS")),
        ({"tls": n.TlsMode.SELECTIVETLS}, option(OPT.STARTTLS, b"x"),
         (OPT.STARTTLS, R.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")),
        ({"tls": n.TlsMode.FORCEDTLS}, option(OPT.LIST),
         (OPT.LIST, R.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")),
        ({"tls": n.TlsMode.FORCEDTLS}, option(OPT.STRUCTURED_REPLY),
         (OPT.STRUCTURED_REPLY, R.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")),
        ({"exports": ["a"]}, option(OPT.LIST, b"x"), (OPT.LIST, R.ERR_INVALID, "NBD_OPT_LIST takes no data")),
        ({}, option(OPT.LIST), (OPT.LIST, R.ERR_POLICY, "this server does not list its exports")),
        ({}, option(OPT.STRUCTURED_REPLY, b"x"),
         (OPT.STRUCTURED_REPLY, R.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")),
        ({"structured_replies": False}, option(OPT.STRUCTURED_REPLY),
         (OPT.STRUCTURED_REPLY, R.ERR_UNSUP, "structured replies are turned off on this server")),
        ({}, option(OPT.EXTENDED_HEADERS, b"x"),
         (OPT.EXTENDED_HEADERS, R.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")),
        ({"extended_headers": False}, option(OPT.EXTENDED_HEADERS),
         (OPT.EXTENDED_HEADERS, R.ERR_UNSUP, "extended headers are turned off on this server")),
        ({"structured_replies": False}, option(OPT.EXTENDED_HEADERS),
         (OPT.EXTENDED_HEADERS, R.ERR_UNSUP, "extended headers are turned off on this server")),
        ({}, option(OPT.INFO, b"\0\0\0\x09disk"), (OPT.INFO, R.ERR_INVALID, "malformed InfoRequestPayload (8 bytes): "
                                                 "stream read less than specified amount, expected 9, found 4")),
        ({}, option(OPT.GO, info_payload("d\0sk")),
         (OPT.GO, R.ERR_INVALID, "an export name must not hold a NUL character")),
        ({}, option(OPT.GO, info_payload("x" * 4097)), (OPT.GO, R.ERR_TOO_BIG, "export name exceeds 4096 bytes")),
        ({}, option(OPT.SET_META_CONTEXT, meta_payload("disk", "base:allocation")),
         (OPT.SET_META_CONTEXT, R.ERR_INVALID, "negotiate structured replies before meta contexts")),
        ({}, option(OPT.LIST_META_CONTEXT, meta_payload("disk", "q\0")),
         (OPT.LIST_META_CONTEXT, R.ERR_INVALID, "a name or query must not hold a NUL character")),
        ({}, option(OPT.LIST_META_CONTEXT, meta_payload("disk", "x" * 4097)),
         (OPT.LIST_META_CONTEXT, R.ERR_TOO_BIG, "a name or query exceeds 4096 bytes")),
        ({}, option(OPT.LIST_META_CONTEXT, meta_payload("x" * 4097)),
         (OPT.LIST_META_CONTEXT, R.ERR_TOO_BIG, "a name or query exceeds 4096 bytes")),
    ],
)  # fmt: skip
def test_each_refusal_in_its_words(setup: dict[str, object], data: bytes, reply: tuple[int, int, str]) -> None:
    s = haggling(**setup)
    assert answered(s, data) == [reply]
    assert s.phase is n.Phase.OPTIONS  # a refused option is no more than that


def test_the_longest_name_is_asked_about_and_a_longer_option_refused() -> None:
    s = haggling()
    assert _requested(s, option(OPT.INFO, info_payload("x" * 4096))).name == "x" * 4096
    s = haggling()
    big = 65536 + 1
    s.receive_data(struct.pack(">QII", n.wire.IHAVEOPT, OPT.INFO, big) + bytes(big))
    assert events(s) == []
    (reply,) = option_replies(joined(s))
    assert (reply.reply_type, w.decode(w.ErrorReplyPayload, reply.data).message) == (
        R.ERR_TOO_BIG, f"option length {big} exceeds 65536 bytes"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "data", "message"),
    [
        ({}, struct.pack(">QII", 0x1234, 1, 0), "option request magic 0x1234 is not IHAVEOPT"),
        ({"fixed": False}, option(OPT.LIST), "option 3 sent by a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE"),
        ({}, struct.pack(">QII", n.wire.IHAVEOPT, OPT.EXPORT_NAME, 65537),
         "option 1 length 65537 exceeds the 65536-byte option limit"),
        ({"fixed": False}, struct.pack(">QII", n.wire.IHAVEOPT, OPT.LIST, 65537),
         "option 3 length 65537 exceeds the 65536-byte option limit"),
        ({"tls": n.TlsMode.FORCEDTLS}, option(OPT.EXPORT_NAME, b"disk"),
         "NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS"),
        ({}, option(OPT.EXPORT_NAME, b"x" * 4097), "export name of 4097 bytes is over 4096 bytes or holds a NUL"),
        ({}, option(OPT.EXPORT_NAME, b"d\0sk"), "export name of 4 bytes is over 4096 bytes or holds a NUL"),
        ({"tls": n.TlsMode.SELECTIVETLS}, option(OPT.STARTTLS) + b"\x16\x03",
         "client sent more data after NBD_OPT_STARTTLS, before the TLS handshake"),
    ],
)  # fmt: skip
def test_each_option_that_ends_the_session_in_its_words(setup: dict[str, object], data: bytes, message: str) -> None:
    assert broken(haggling(**setup), data) == message


def test_export_name_after_extended_headers_ends_the_session() -> None:
    s = haggling()
    assert answered(s, option(OPT.EXTENDED_HEADERS)) == [(OPT.EXTENDED_HEADERS, R.ACK, "")]
    assert broken(s, option(OPT.EXPORT_NAME, b"disk")) == "NBD_OPT_EXPORT_NAME after extended headers were negotiated"


def test_unknown_client_flags_in_their_words() -> None:
    s = new_server()
    assert broken(s, client_flags(0x83)) == "client flags 0x83 include unknown bits 0x80"


def test_starttls_twice_and_structured_replies_after_extended_headers() -> None:
    s = haggling(tls=n.TlsMode.SELECTIVETLS)
    s.receive_data(option(OPT.STARTTLS))
    assert isinstance(s.next_event(), n.StartTLS)
    s.tls_established()
    joined(s)
    assert answered(s, option(OPT.STARTTLS)) == [(OPT.STARTTLS, R.ERR_INVALID, "TLS is already active")]
    assert answered(s, option(OPT.EXTENDED_HEADERS)) == [(OPT.EXTENDED_HEADERS, R.ACK, "")]
    assert answered(s, option(OPT.STRUCTURED_REPLY)) == [
        (OPT.STRUCTURED_REPLY, R.ERR_EXT_HEADER_REQD, "extended headers are already negotiated")
    ]


def _requested(s: ServerConnection, data: bytes) -> n.ExportRequested:
    s.receive_data(data)
    (requested,) = events(s)
    assert isinstance(requested, n.ExportRequested)
    return requested


def test_an_unknown_export_and_its_message() -> None:
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("nope")))
    s.send(n.ExportUnknown())
    assert [(r.reply_type, w.decode(w.ErrorReplyPayload, r.data).message) for r in option_replies(joined(s))] == [
        (R.ERR_UNKNOWN, "unknown export")
    ]
    _requested(s, option(OPT.INFO, info_payload("gone")))
    s.send(n.ExportUnknown("gone for good", R.ERR_SHUTDOWN))
    (reply,) = option_replies(joined(s))
    assert (reply.reply_type, w.decode(w.ErrorReplyPayload, reply.data).message) == (R.ERR_SHUTDOWN, "gone for good")


@pytest.mark.parametrize(
    ("setup", "data", "answer", "message"),
    [
        ({}, option(OPT.GO, info_payload("x")), n.ExportUnknown("no", R.ACK),
         "ExportUnknown.reply_type ACK is not an error"),
        ({"tls": n.TlsMode.NOTLS}, option(OPT.GO, info_payload("x")), n.ExportUnknown("tls", R.ERR_TLS_REQD),
         "NBD_REP_ERR_TLS_REQD may only answer INFO or GO, before TLS, on a TLS server"),
        ({"tls": n.TlsMode.SELECTIVETLS, "structured": True}, option(OPT.LIST_META_CONTEXT, meta_payload("x")),
         n.ExportUnknown("tls", R.ERR_TLS_REQD),
         "NBD_REP_ERR_TLS_REQD may only answer INFO or GO, before TLS, on a TLS server"),
    ],
)  # fmt: skip
def test_answers_the_application_may_not_give(
    setup: dict[str, object], data: bytes, answer: object, message: str
) -> None:
    s = haggling(**setup)
    _requested(s, data)
    with pytest.raises(n.LocalProtocolError) as refused:
        s.send(answer)  # type: ignore[arg-type]
    assert str(refused.value) == message


def test_go_cannot_be_unsupported_once_extended_headers_were_agreed() -> None:
    s = haggling()
    answered(s, option(OPT.EXTENDED_HEADERS))
    _requested(s, option(OPT.GO, info_payload("x")))
    with pytest.raises(n.LocalProtocolError) as refused:
        s.send(n.ExportUnknown("no GO here", R.ERR_UNSUP))
    assert str(refused.value) == "NBD_OPT_GO cannot be unsupported once extended headers were agreed"
    s = haggling()
    _requested(s, option(OPT.INFO, info_payload("x")))
    s.send(n.ExportUnknown("no INFO here", R.ERR_UNSUP))  # without extended headers: any refusal
    assert [r.reply_type for r in option_replies(joined(s))] == [R.ERR_UNSUP]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"minimum_block_size": 3}, "minimum block size 3 must be a power of two from 1 to 65536"),
        ({"minimum_block_size": 0}, "minimum block size 0 must be a power of two from 1 to 65536"),
        ({"minimum_block_size": 131072, "preferred_block_size": 131072},
         "minimum block size 131072 must be a power of two from 1 to 65536"),
        ({"preferred_block_size": 256}, "preferred block size 256 must be a power of two >= 512 and >= 1"),
        ({"minimum_block_size": 8192, "preferred_block_size": 4096},
         "preferred block size 4096 must be a power of two >= 512 and >= 8192"),
        ({"preferred_block_size": 3000}, "preferred block size 3000 must be a power of two >= 512 and >= 1"),
        ({"maximum_payload": 2048}, "maximum payload 2048 must be from 4096 to 0xffffffff"),
        ({"maximum_payload": 1 << 32}, "maximum payload 4294967296 must be from 4096 to 0xffffffff"),
    ],
)  # fmt: skip
def test_block_sizes_an_export_may_not_advertise(sizes: dict[str, int], message: str) -> None:
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("disk", n.InfoType.BLOCK_SIZE)))
    with pytest.raises(n.LocalProtocolError) as refused:
        s.send(export(**sizes))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "sizes",
    [
        {"minimum_block_size": 1, "preferred_block_size": 512, "maximum_payload": 512},
        {"minimum_block_size": 65536, "preferred_block_size": 65536, "maximum_payload": 0xFFFFFFFF},
        {"minimum_block_size": 512, "preferred_block_size": 512, "maximum_payload": 512},
    ],
)
def test_block_sizes_at_the_edges_are_advertised(sizes: dict[str, int]) -> None:
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("disk", n.InfoType.BLOCK_SIZE)))
    s.send(export(**sizes))
    (done,) = events(s)
    assert isinstance(done, n.HandshakeComplete)


def test_an_export_that_needs_block_sizes_says_so() -> None:
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("disk")))
    s.send(export(minimum_block_size=512, preferred_block_size=4096))
    replies = option_replies(joined(s))
    assert [r.reply_type for r in replies] == [R.INFO, R.ERR_BLOCK_SIZE_REQD]
    assert struct.unpack(">HIII", replies[0].data) == (n.InfoType.BLOCK_SIZE, 512, 4096, 32 * MIB)
    assert (
        w.decode(w.ErrorReplyPayload, replies[1].data).message
        == "this export needs NBD_INFO_BLOCK_SIZE to be requested"
    )
    assert s.phase is n.Phase.OPTIONS


def test_a_meta_context_query_without_a_namespace() -> None:
    s = haggling(structured=True)
    _requested(s, option(OPT.SET_META_CONTEXT, meta_payload("disk", "allocation")))
    s.send(export())
    (reply,) = option_replies(joined(s))
    assert (reply.reply_type, w.decode(w.ErrorReplyPayload, reply.data).message) == (
        R.ERR_INVALID, "a meta context query must start with a namespace and a colon"
    )  # fmt: skip


def test_an_option_of_exactly_64_kib_is_read_and_answered() -> None:
    s = haggling()
    (got,) = answered(s, option(99, bytes(65536)))
    assert got == (99, R.ERR_UNSUP, "option 99 is not supported")  # read whole, not refused for its size


def test_an_option_arriving_in_parts_is_taken_once_whole() -> None:
    s = haggling()
    whole = option(OPT.GO, info_payload("disk"))
    for cut in (1, 17, len(whole) - 1):
        s = haggling()
        s.receive_data(whole[:cut])
        assert events(s) == [] and s.data_to_send() == []
        assert _requested(s, whole[cut:]) == n.ExportRequested("disk", OPT.GO)


def test_names_and_queries_of_exactly_4096_bytes_are_taken() -> None:
    name = "n" * 4096
    s = haggling()
    assert _requested(s, option(OPT.EXPORT_NAME, name.encode())) == n.ExportRequested(name, OPT.EXPORT_NAME)
    s = haggling(structured=True)
    assert _requested(s, option(OPT.LIST_META_CONTEXT, meta_payload(name, "q" * 4096))).name == name


def test_a_tls_only_export_before_tls() -> None:
    s = haggling(tls=n.TlsMode.SELECTIVETLS)
    _requested(s, option(OPT.GO, info_payload("disk")))
    s.send(export(tls_required=True))
    (reply,) = option_replies(joined(s))
    assert (reply.reply_type, w.decode(w.ErrorReplyPayload, reply.data).message) == (
        R.ERR_TLS_REQD, "this export requires TLS"
    )  # fmt: skip
    s = haggling(tls=n.TlsMode.SELECTIVETLS, structured=True)
    _requested(s, option(OPT.LIST_META_CONTEXT, meta_payload("disk")))
    s.send(export(tls_required=True))
    (reply,) = option_replies(joined(s))
    assert (reply.reply_type, w.decode(w.ErrorReplyPayload, reply.data).message) == (
        R.ERR_POLICY, "this export requires TLS"
    )  # fmt: skip


@pytest.mark.parametrize("minimum", [2, 512])
def test_any_minimum_block_size_above_1_needs_the_sizes_asked_for(minimum: int) -> None:
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("disk")))
    s.send(export(minimum_block_size=minimum))
    assert [r.reply_type for r in option_replies(joined(s))] == [R.INFO, R.ERR_BLOCK_SIZE_REQD]
    s = haggling()
    _requested(s, option(OPT.GO, info_payload("disk")))
    s.send(export(minimum_block_size=1))
    (done,) = events(s)
    assert isinstance(done, n.HandshakeComplete)


def test_the_export_chosen_is_the_connection_s() -> None:
    s = haggling()
    assert s.export is None
    _requested(s, option(OPT.GO, info_payload("disk")))
    chosen = export()
    s.send(chosen)
    events(s)
    assert s.export is chosen
