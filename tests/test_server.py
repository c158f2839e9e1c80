"""ServerConnection alone, driven with raw client bytes: the handshake, request validation and replies."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
import nbdproto.wire
from nbdproto.engine._server import ServerConnection
from nbdproto.wire import layout as w
from tests.nbdbytes import (
    GREETING_SIZE,
    client_flags,
    info_payload,
    joined,
    meta_payload,
    option,
    option_replies,
    replies,
    request,
)

OPT, R, C, F = n.Option, n.OptionReplyType, n.Command, n.CommandFlags
TF = n.TransmissionFlags
RW_FLAGS = (
    TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO | TF.SEND_CACHE
)
MIB = 1 << 20


def export(name: str = "disk", size: int = MIB, **kw: object) -> n.Export:
    kw.setdefault("flags", RW_FLAGS)
    kw.setdefault("meta_contexts", (n.BASE_ALLOCATION, "example:odd-blocks"))
    return n.Export(name, size, **kw)  # type: ignore[arg-type]


def new_server(**kw: object) -> ServerConnection:
    s = ServerConnection(**kw)  # type: ignore[arg-type]
    assert len(joined(s)) == GREETING_SIZE
    return s


def events(s: ServerConnection) -> list[object]:
    out = []
    while True:
        ev = s.next_event()
        if ev is n.NEED_DATA or ev is n.PAUSED:
            return out
        out.append(ev)
        if isinstance(ev, (n.ConnectionClosed, n.ExportRequested)):
            return out


def handshake(
    s: ServerConnection, *, structured: bool = True, extended: bool = False, contexts: tuple[str, ...] = (), exp=None
) -> n.HandshakeComplete:
    exp = exp or export()
    data = client_flags()
    if extended:
        data += option(OPT.EXTENDED_HEADERS)
    elif structured:
        data += option(OPT.STRUCTURED_REPLY)
    s.receive_data(data)
    assert events(s) == []
    if contexts:
        s.receive_data(option(OPT.SET_META_CONTEXT, meta_payload(exp.name, *contexts)))
        assert events(s) == [n.ExportRequested(exp.name, OPT.SET_META_CONTEXT)]
        s.send(exp)
    s.receive_data(option(OPT.GO, info_payload(exp.name, n.InfoType.BLOCK_SIZE)))
    assert events(s) == [n.ExportRequested(exp.name, OPT.GO)]
    s.send(exp)
    (done,) = events(s)
    assert isinstance(done, n.HandshakeComplete)
    joined(s)
    assert s.phase is n.Phase.TRANSMISSION
    return done


# --- Greeting and client flags -------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    s = ServerConnection()
    greeting = w.decode(w.NewstyleGreeting, joined(s))
    assert greeting.handshake_flags == n.HandshakeFlags.FIXED_NEWSTYLE | n.HandshakeFlags.NO_ZEROES


def test_unknown_client_flags_end_the_connection() -> None:
    s = new_server()
    s.receive_data(client_flags(1 << 7))
    with pytest.raises(n.RemoteProtocolError, match="unknown bits"):
        s.next_event()
    assert s.phase is n.Phase.ERROR


def test_client_closing_during_greeting_is_a_clean_close() -> None:
    s = new_server()
    s.receive_data(b"\0\0")
    s.receive_data(b"")
    assert isinstance(s.next_event(), n.ConnectionClosed)


# --- Options -------------------------------------------------------------------------------------------------


def test_list_answers_with_the_offer_list() -> None:
    s = new_server(exports=["a", n.ExportListing("b", "second disk")])
    s.receive_data(client_flags() + option(OPT.LIST))
    assert events(s) == []
    got = option_replies(joined(s))
    assert [(x.reply_type, w.decode(w.ServerPayload, x.data)) for x in got[:2]] == [
        (R.SERVER, {"name": "a", "description": ""}),
        (R.SERVER, {"name": "b", "description": "second disk"}),
    ]
    assert got[2].reply_type == R.ACK


def test_list_without_an_offer_list_is_refused_by_policy() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.LIST) + option(OPT.LIST, b"x"))
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_POLICY, R.ERR_INVALID]
    s = new_server(exports=[])
    s.receive_data(client_flags() + option(OPT.LIST, b"junk"))
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_INVALID]


@pytest.mark.parametrize("code", [OPT.PEEK_EXPORT, 12, 0, 0xFFFFFFFF])
def test_unknown_options_get_unsup_and_haggling_goes_on(code: int) -> None:
    s = new_server(exports=["a"])
    s.receive_data(client_flags() + option(code, b"payload") + option(OPT.LIST))
    events(s)
    got = option_replies(joined(s))
    assert (got[0].option, got[0].reply_type) == (code, R.ERR_UNSUP)
    assert got[-1].reply_type == R.ACK


def test_oversized_option_is_refused_and_skipped_without_buffering() -> None:
    s = new_server(exports=["a"])
    size = 1 << 30
    s.receive_data(client_flags() + struct.pack(">QII", n.wire.IHAVEOPT, 99, size))
    tracemalloc.start()
    chunk = bytes(1 << 20)
    for _ in range(size // len(chunk)):
        s.receive_data(chunk)
        assert s.next_event() is n.NEED_DATA
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * len(chunk)
    s.receive_data(option(OPT.LIST))
    events(s)
    got = option_replies(joined(s))
    assert got[0].reply_type == R.ERR_TOO_BIG and got[-1].reply_type == R.ACK


def test_oversized_export_name_ends_the_connection() -> None:
    s = new_server()
    s.receive_data(client_flags() + struct.pack(">QII", n.wire.IHAVEOPT, OPT.EXPORT_NAME, 1 << 31))
    with pytest.raises(n.RemoteProtocolError, match="exceeds"):
        s.next_event()


def test_wrong_option_magic_ends_the_connection() -> None:
    s = new_server()
    s.receive_data(client_flags() + struct.pack(">QII", 0x1234, OPT.LIST, 0))
    with pytest.raises(n.RemoteProtocolError, match="IHAVEOPT"):
        s.next_event()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply_with_and_without_zeroes(no_zeroes: bool) -> None:
    s = new_server()
    flags = n.ClientFlags.FIXED_NEWSTYLE | (n.ClientFlags.NO_ZEROES if no_zeroes else 0)
    s.receive_data(client_flags(flags) + option(OPT.EXPORT_NAME, b"disk"))
    assert events(s) == [n.ExportRequested("disk", OPT.EXPORT_NAME)]
    s.send(export())
    assert isinstance(s.next_event(), n.HandshakeComplete)
    fmt = w.ExportNameReplyNoZeroes if no_zeroes else w.ExportNameReply
    reply = w.decode(fmt, joined(s))
    assert reply.size == MIB and reply.transmission_flags == RW_FLAGS


def test_export_name_for_an_unknown_export_closes() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXPORT_NAME, b"nope"))
    events(s)
    s.send(n.ExportUnknown())
    assert isinstance(s.next_event(), n.ConnectionClosed)
    assert s.phase is n.Phase.CLOSED and joined(s) == b""


def test_nonfixed_newstyle_client_may_only_use_export_name() -> None:
    s = new_server()
    s.receive_data(client_flags(0) + option(OPT.EXPORT_NAME, b""))
    assert events(s) == [n.ExportRequested("", OPT.EXPORT_NAME)]
    s = new_server()
    s.receive_data(client_flags(0) + option(OPT.LIST))
    with pytest.raises(n.RemoteProtocolError, match="FIXED_NEWSTYLE"):
        s.next_event()


def test_abort_is_acknowledged_and_surfaces_as_client_aborted() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.ABORT, b"ignored"))
    assert isinstance(s.next_event(), n.ClientAborted)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ACK]
    assert isinstance(s.next_event(), n.ConnectionClosed)


def test_info_then_go_answer_every_requested_info_in_order() -> None:
    s = new_server()
    exp = export(description="a test disk", minimum_block_size=512, preferred_block_size=4096, maximum_payload=MIB)
    requests = (n.InfoType.BLOCK_SIZE, 77, n.InfoType.DESCRIPTION, n.InfoType.NAME)
    s.receive_data(client_flags() + option(OPT.INFO, info_payload("disk", *requests)))
    assert events(s) == [n.ExportRequested("disk", OPT.INFO)]
    s.send(exp)
    assert events(s) == []
    got = option_replies(joined(s))
    assert [x.reply_type for x in got] == [R.INFO] * 4 + [R.ACK]
    infos = {struct.unpack(">H", x.data[:2])[0]: x.data for x in got[:-1]}
    assert w.decode(w.InfoExportPayload, infos[0]).size == MIB
    assert w.decode(w.InfoNamePayload, infos[1]).name == "disk"
    assert w.decode(w.InfoDescriptionPayload, infos[2]).description == "a test disk"
    sizes = w.decode(w.InfoBlockSizePayload, infos[3])
    assert (sizes.minimum, sizes.preferred, sizes.maximum) == (512, 4096, MIB)
    assert s.phase is n.Phase.OPTIONS


def test_go_without_block_size_is_refused_when_the_export_needs_alignment() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.GO, info_payload("disk")))
    events(s)
    s.send(export(minimum_block_size=512))
    got = option_replies(joined(s))
    assert [x.reply_type for x in got] == [R.INFO, R.ERR_BLOCK_SIZE_REQD]
    assert s.phase is n.Phase.OPTIONS


def test_go_for_an_unknown_export_is_an_error_and_haggling_goes_on() -> None:
    s = new_server(exports=[])
    s.receive_data(client_flags() + option(OPT.GO, info_payload("nope")))
    events(s)
    s.send(n.ExportUnknown("no such disk"))
    s.receive_data(option(OPT.LIST))
    events(s)
    got = option_replies(joined(s))
    assert got[0].reply_type == R.ERR_UNKNOWN and b"no such disk" in got[0].data
    assert got[-1].reply_type == R.ACK


@pytest.mark.parametrize("payload", [b"\0\0\0\x09abc", b"\0\0\0\0\0\x02\0\x01", b"\xff" * 3, b"\0\0\0\0\0\0junk"])
def test_malformed_info_payload_is_invalid(payload: bytes) -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.GO, payload))
    assert events(s) == []
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_INVALID]


def test_sending_the_answer_without_a_question_is_a_local_error() -> None:
    s = new_server()
    with pytest.raises(n.LocalProtocolError):
        s.send(export())


def test_structured_and_extended_options() -> None:
    s = new_server()
    s.receive_data(
        client_flags()
        + option(OPT.STRUCTURED_REPLY, b"x")
        + option(OPT.EXTENDED_HEADERS)
        + option(OPT.STRUCTURED_REPLY)
        + option(OPT.EXTENDED_HEADERS, b"x")
    )
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [
        R.ERR_INVALID,
        R.ACK,
        R.ERR_EXT_HEADER_REQD,
        R.ERR_INVALID,
    ]
    assert s.extended_headers and s.structured_replies


def test_old_server_behaviour_refuses_structured_replies() -> None:
    s = new_server(structured_replies=False)
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.EXTENDED_HEADERS))
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_UNSUP, R.ERR_UNSUP]


# --- Meta contexts -------------------------------------------------------------------------------------------


def meta_replies(s: ServerConnection) -> tuple[list[tuple[int, str]], int]:
    got = option_replies(joined(s))
    contexts = []
    for x in got[:-1]:
        assert x.reply_type == R.META_CONTEXT
        fields = w.decode(w.MetaContextReplyPayload, x.data)
        contexts.append((fields.context_id, fields.name))
    return contexts, got[-1].reply_type


def test_set_meta_context_needs_structured_replies() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.SET_META_CONTEXT, meta_payload("disk", n.BASE_ALLOCATION)))
    assert events(s) == []
    assert meta_replies(s) == ([], R.ERR_INVALID)


@pytest.mark.parametrize(
    ("queries", "listing", "expected"),
    [
        ((), True, [n.BASE_ALLOCATION, "example:odd-blocks"]),
        (("base:",), True, [n.BASE_ALLOCATION]),
        (("base:",), False, []),
        (("base:allocation", "unknown:thing", "base:nothing"), False, [n.BASE_ALLOCATION]),
        (("example:odd-blocks", "base:allocation"), False, [n.BASE_ALLOCATION, "example:odd-blocks"]),
        ((), False, []),
    ],
)
def test_meta_context_queries(queries: tuple[str, ...], listing: bool, expected: list[str]) -> None:
    s = new_server()
    code = OPT.LIST_META_CONTEXT if listing else OPT.SET_META_CONTEXT
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY) + option(code, meta_payload("disk", *queries)))
    assert events(s) == [n.ExportRequested("disk", code)]
    option_replies(joined(s))
    s.send(export())
    contexts, last = meta_replies(s)
    assert last == R.ACK
    assert sorted(name for _, name in contexts) == sorted(expected)
    ids = [context_id for context_id, _ in contexts]
    if listing:
        assert set(ids) <= {0}
    else:
        assert 0 not in ids and len(set(ids)) == len(ids) and s.meta_contexts == dict(contexts)


def test_meta_context_query_without_namespace_is_invalid() -> None:
    s = new_server()
    s.receive_data(
        client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.LIST_META_CONTEXT, meta_payload("d", "x"))
    )
    events(s)
    option_replies(joined(s))
    s.send(export("d"))
    assert meta_replies(s) == ([], R.ERR_INVALID)


def test_meta_contexts_only_carry_over_to_the_same_export() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY))
    events(s)
    s.receive_data(option(OPT.SET_META_CONTEXT, meta_payload("one", n.BASE_ALLOCATION)))
    events(s)
    s.send(export("one"))
    s.receive_data(option(OPT.GO, info_payload("two", n.InfoType.BLOCK_SIZE)))
    events(s)
    s.send(export("two"))
    done = s.next_event()
    assert isinstance(done, n.HandshakeComplete) and done.meta_contexts == {}


# --- TLS modes -----------------------------------------------------------------------------------------------


def test_notls_refuses_starttls_by_policy() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.STARTTLS))
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_POLICY]


def test_forcedtls_refuses_everything_but_starttls_and_abort() -> None:
    s = new_server(tls=n.TlsMode.FORCEDTLS, exports=["a"])
    s.receive_data(
        client_flags()
        + option(OPT.LIST)
        + option(OPT.INFO, info_payload("a"))
        + option(OPT.GO, info_payload("a"))
        + option(OPT.STRUCTURED_REPLY)
        + option(99)
    )
    assert events(s) == []
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_TLS_REQD] * 5
    s.receive_data(option(OPT.EXPORT_NAME, b"a"))
    with pytest.raises(n.RemoteProtocolError, match="TLS"):
        s.next_event()


def test_starttls_upgrade_forgets_negotiation_and_is_not_repeatable() -> None:
    s = new_server(tls=n.TlsMode.FORCEDTLS)
    s.receive_data(client_flags() + option(OPT.STARTTLS, b"x") + option(OPT.STARTTLS))
    assert isinstance(s.next_event(), n.StartTLS)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_INVALID, R.ACK]
    assert s.phase is n.Phase.TLS_UPGRADE and s.next_event() is n.PAUSED
    s.tls_established()
    assert s.tls_active and not s.structured_replies
    s.receive_data(option(OPT.STARTTLS) + option(OPT.STRUCTURED_REPLY))
    events(s)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ERR_INVALID, R.ACK]


def test_plaintext_pipelined_after_starttls_is_refused() -> None:
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    s.receive_data(client_flags() + option(OPT.STARTTLS) + option(OPT.LIST))
    with pytest.raises(n.RemoteProtocolError, match="STARTTLS"):
        s.next_event()


def test_structured_replies_before_starttls_are_forgotten() -> None:
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.STARTTLS))
    assert isinstance(s.next_event(), n.StartTLS)
    assert s.structured_replies
    s.tls_established()
    assert not s.structured_replies


def test_selectivetls_guards_tls_only_exports() -> None:
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    secret = export("secret", tls_required=True)
    s.receive_data(client_flags() + option(OPT.INFO, info_payload("secret")))
    events(s)
    s.send(secret)
    s.receive_data(option(OPT.INFO, info_payload("public")))
    events(s)
    s.send(export("public"))
    got = [x.reply_type for x in option_replies(joined(s))]
    assert got == [R.ERR_TLS_REQD, R.INFO, R.ACK]
    s.receive_data(option(OPT.STARTTLS))
    assert isinstance(s.next_event(), n.StartTLS)
    s.tls_established()
    joined(s)
    s.receive_data(option(OPT.INFO, info_payload("secret")))
    events(s)
    s.send(secret)
    assert [x.reply_type for x in option_replies(joined(s))] == [R.INFO, R.ACK]


def test_tls_reqd_is_never_sent_without_tls() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.GO, info_payload("x")))
    events(s)
    with pytest.raises(n.LocalProtocolError):
        s.send(n.ExportUnknown("x", R.ERR_TLS_REQD))


# --- Transmission: validation --------------------------------------------------------------------------------


@pytest.fixture(params=["simple", "structured", "extended"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def transmission(mode: str, **kw: object) -> ServerConnection:
    s = new_server()
    handshake(s, structured=mode != "simple", extended=mode == "extended", **kw)  # type: ignore[arg-type]
    return s


def errors_of(s: ServerConnection, data: bytes) -> list[int]:
    s.receive_data(data)
    assert events(s) == [], "an invalid request reached the application"
    return [c.error for c in replies(joined(s))]


BAD_REQUESTS = [
    ("read past the end", C.READ, MIB - 512, 1024, 0, n.Errno.EINVAL),
    ("read of length 0", C.READ, 0, 0, 0, n.Errno.EINVAL),
    ("trim past the end", C.TRIM, MIB, 512, 0, n.Errno.EINVAL),
    ("zero past the end", C.WRITE_ZEROES, MIB, 512, 0, n.Errno.ENOSPC),
    ("unknown command", 42, 0, 512, 0, n.Errno.EINVAL),
    ("unknown flag", C.READ, 0, 512, 1 << 9, n.Errno.EINVAL),
    ("DF on a cache", C.CACHE, 0, 512, F.DF, n.Errno.EINVAL),
    ("NO_HOLE on a trim", C.TRIM, 0, 512, F.NO_HOLE, n.Errno.EINVAL),
    ("REQ_ONE on a read", C.READ, 0, 512, F.REQ_ONE, n.Errno.EINVAL),
    ("block status without contexts", C.BLOCK_STATUS, 0, 512, 0, n.Errno.EINVAL),
    ("resize not advertised", C.RESIZE, 2 * MIB, 0, 0, n.Errno.EINVAL),
    ("read beyond max payload", C.READ, 0, MIB, 0, None),
]


@pytest.mark.parametrize(
    ("why", "cmd", "offset", "length", "flags", "errno"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_invalid_requests_are_answered_by_the_engine(
    mode: str, why: str, cmd: int, offset: int, length: int, flags: int, errno: int | None
) -> None:
    s = new_server()
    exp = export(size=4 * MIB if errno is None else MIB, maximum_payload=MIB // 2)
    handshake(s, structured=mode != "simple", extended=mode == "extended", exp=exp)
    if errno is None:
        errno = n.Errno.EINVAL if mode == "simple" else n.Errno.EOVERFLOW
    s.receive_data(request(cmd, 7, offset, length, flags, extended=mode == "extended"))
    assert events(s) == [], "an invalid request reached the application"
    (reply,) = replies(joined(s))
    assert reply.error == errno
    # spec: with structured replies even an early error to a READ is a structured reply; with extended
    # headers no simple reply is ever sent. The engine always uses an ERROR chunk, which carries a message.
    if mode == "simple":
        assert reply.chunk_type is None
    else:
        assert reply.chunk_type == n.ChunkType.ERROR and reply.flags == n.ReplyFlags.DONE and reply.fields.message


def test_write_past_the_end_is_enospc_and_its_payload_is_consumed(mode: str) -> None:
    s = transmission(mode)
    ext = mode == "extended"
    flags = F.PAYLOAD_LEN if ext else 0
    data = request(C.WRITE, 1, MIB - 2, 4, flags, extended=ext) + b"abcd" + request(C.FLUSH, 2, extended=ext)
    s.receive_data(data)
    assert events(s) == [n.FlushRequest(2)]
    assert [c.error for c in replies(joined(s))] == [n.Errno.ENOSPC]


def test_writes_to_a_read_only_export_are_eperm(mode: str) -> None:
    s = new_server()
    handshake(
        s,
        structured=mode != "simple",
        extended=mode == "extended",
        exp=export(flags=TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_TRIM),
    )
    ext = mode == "extended"
    data = request(C.WRITE, 1, 0, 2, F.PAYLOAD_LEN if ext else 0, extended=ext) + b"hi"
    data += request(C.TRIM, 2, 0, 512, extended=ext)
    assert errors_of(s, data) == [n.Errno.EPERM, n.Errno.EPERM]


def test_unaligned_requests_are_einval() -> None:
    s = new_server()
    handshake(s, exp=export(minimum_block_size=512))
    assert errors_of(s, request(C.READ, 1, 100, 512) + request(C.READ, 2, 512, 100)) == [n.Errno.EINVAL] * 2


def test_features_not_advertised_are_einval() -> None:
    s = new_server()
    handshake(s, exp=export(flags=TF.HAS_FLAGS))
    data = (
        request(C.FLUSH, 1)
        + request(C.TRIM, 2, 0, 512)
        + request(C.CACHE, 3, 0, 512)
        + request(C.WRITE_ZEROES, 4, 0, 512)
        + request(C.WRITE, 5, 0, 1, F.FUA)
        + b"x"
    )
    assert errors_of(s, data) == [n.Errno.EINVAL] * 5


def test_df_needs_structured_replies() -> None:
    s = transmission("simple")
    assert errors_of(s, request(C.READ, 1, 0, 512, F.DF)) == [n.Errno.EINVAL]


def test_oversized_compact_write_is_refused_without_buffering() -> None:
    s = new_server()
    handshake(s, exp=export(size=1 << 40, maximum_payload=MIB))
    s.receive_data(request(C.WRITE, 1, 0, 0xFFFFFFFF))
    tracemalloc.start()
    chunk = bytes(MIB)
    for _ in range(64):
        s.receive_data(chunk)
        assert s.next_event() is n.NEED_DATA
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * MIB
    assert [c.error for c in replies(joined(s))] == [n.Errno.EINVAL]


def test_oversized_extended_payload_ends_the_connection() -> None:
    s = transmission("extended")
    s.receive_data(request(C.WRITE, 1, 0, 1 << 40, F.PAYLOAD_LEN, extended=True))
    with pytest.raises(n.RemoteProtocolError, match="maximum"):
        s.next_event()


def test_payload_len_on_other_commands_is_consumed_then_einval() -> None:
    s = transmission("extended")
    data = request(C.READ, 1, 0, 4, F.PAYLOAD_LEN, extended=True) + b"junk" + request(C.FLUSH, 2, extended=True)
    s.receive_data(data)
    assert events(s) == [n.FlushRequest(2)]
    assert [c.error for c in replies(joined(s))] == [n.Errno.EINVAL]


def test_extended_write_without_payload_len_is_einval() -> None:
    s = transmission("extended")
    assert errors_of(s, request(C.WRITE, 1, 0, 4, extended=True)) == [n.Errno.EINVAL]


def test_compact_request_with_payload_len_is_einval() -> None:
    s = transmission("structured")
    assert errors_of(s, request(C.READ, 1, 0, 4, F.PAYLOAD_LEN)) == [n.Errno.EINVAL]


def test_wrong_request_magic_ends_the_connection(mode: str) -> None:
    s = transmission(mode)
    s.receive_data(struct.pack(">IHHQQI", 0x12560953, 0, 0, 1, 0, 512) + bytes(8))
    with pytest.raises(n.RemoteProtocolError, match="magic"):
        s.next_event()
    assert s.phase is n.Phase.ERROR
    with pytest.raises(n.LocalProtocolError):
        s.receive_data(b"more")


def test_a_cookie_reused_while_in_flight_waits_for_the_first_reply() -> None:
    # Cookies are opaque to a server; a client only SHOULD keep them distinct. The second request is held back
    # (PAUSED: the driver lets what is in flight finish) and then served like any other.
    s = transmission("simple")
    s.receive_data(request(C.READ, 9, 0, 512) + request(C.READ, 9, 512, 512) + request(C.FLUSH, 10, 0, 0))
    first = s.next_event()
    assert isinstance(first, n.ReadRequest) and first.offset == 0
    assert s.next_event() is n.PAUSED
    s.send(n.ReadData(9, 0, bytes(512)))
    second = s.next_event()
    assert isinstance(second, n.ReadRequest) and (second.cookie, second.offset) == (9, 512)
    assert isinstance(s.next_event(), n.FlushRequest)


# --- Transmission: requests and replies ----------------------------------------------------------------------


def test_every_command_reaches_the_application(mode: str) -> None:
    s = new_server()
    exp = export(flags=RW_FLAGS | TF.SEND_RESIZE)
    handshake(s, structured=mode != "simple", extended=mode == "extended", exp=exp)
    ext = mode == "extended"
    wflag = F.PAYLOAD_LEN if ext else 0
    s.receive_data(
        request(C.READ, 1, 0, 512, extended=ext)
        + request(C.WRITE, 2, 512, 3, F.FUA | wflag, extended=ext)
        + b"abc"
        + request(C.FLUSH, 3, extended=ext)
        + request(C.TRIM, 4, 0, 4096, F.FUA, extended=ext)
        + request(C.CACHE, 5, 0, 4096, extended=ext)
        + request(C.WRITE_ZEROES, 6, 0, 4096, F.NO_HOLE | F.FAST_ZERO | F.FUA, extended=ext)
        + request(C.RESIZE, 7, 2 * MIB, 0, extended=ext)
        + request(C.DISC, 8, extended=ext)
    )
    got = events(s)
    assert got[0] == n.ReadRequest(1, 0, 512)
    assert isinstance(got[1], n.WriteRequest) and bytes(got[1].data) == b"abc" and got[1].flags == F.FUA
    assert got[2:] == [
        n.FlushRequest(3),
        n.TrimRequest(4, 0, 4096, F.FUA),
        n.CacheRequest(5, 0, 4096),
        n.WriteZeroesRequest(6, 0, 4096, F.NO_HOLE | F.FAST_ZERO | F.FUA),
        n.ResizeRequest(7, 2 * MIB),
        n.DisconnectRequest(8),
    ]
    assert s.in_flight == 7 and s.next_event() is n.PAUSED
    s.send(n.ReadData(1, 0, bytes(512)))
    for cookie in range(2, 8):
        s.send(n.SuccessReply(cookie))
    assert isinstance(s.next_event(), n.ConnectionClosed)
    chunks = replies(joined(s), {1: 512})
    assert [c.cookie for c in chunks] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c.error == 0 for c in chunks)
    if mode == "extended":
        assert all(c.chunk_type is not None for c in chunks)
        assert [c.offset for c in chunks] == [0, 512, 0, 0, 0, 0, 2 * MIB]


def test_simple_read_reply_streams_data_and_holes_in_order() -> None:
    s = transmission("simple")
    s.receive_data(request(C.READ, 1, 4096, 3000))
    assert events(s) == [n.ReadRequest(1, 4096, 3000)]
    s.send(n.ReadData(1, 4096, b"a" * 1000, done=False))
    with pytest.raises(n.LocalProtocolError, match="expected"):
        s.send(n.ReadHole(1, 6096, 1000))
    s = transmission("simple")
    s.receive_data(request(C.READ, 1, 4096, 3000))
    events(s)
    s.send(n.ReadData(1, 4096, b"a" * 1000, done=False))
    s.send(n.ReadHole(1, 5096, 1000))
    s.send(n.ReadData(1, 6096, b"b" * 1000))
    (reply,) = replies(joined(s), {1: 3000})
    assert reply.data == b"a" * 1000 + bytes(1000) + b"b" * 1000
    assert s.in_flight == 0


def test_structured_read_in_chunks_out_of_order() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 3000))
    events(s)
    s.send(n.ReadData(1, 2000, b"c" * 1000, done=False))
    s.send(n.ReadHole(1, 0, 1000))
    with pytest.raises(n.LocalProtocolError, match="overlaps"):
        s.send(n.ReadData(1, 500, b"x" * 600, done=False))


def test_structured_read_chunks_and_done_flag() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 3000))
    events(s)
    s.send(n.ReadData(1, 2000, b"c" * 1000, done=False))
    s.send(n.ReadHole(1, 0, 1000))
    s.send(n.ReadData(1, 1000, b"b" * 1000))
    chunks = replies(joined(s))
    assert [(c.chunk_type, c.flags) for c in chunks] == [
        (n.ChunkType.OFFSET_DATA, 0),
        (n.ChunkType.OFFSET_HOLE, 0),
        (n.ChunkType.OFFSET_DATA, n.ReplyFlags.DONE),
    ]
    assert chunks[1].fields.offset == 0 and chunks[1].fields.hole_size == 1000
    assert chunks[2].fields.data == b"b" * 1000


def test_df_read_must_be_one_chunk() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 1024, F.DF))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="DF"):
        s.send(n.ReadData(1, 0, bytes(512), done=False))


def test_read_done_too_early_is_a_local_error() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 1024))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="done"):
        s.send(n.ReadData(1, 0, bytes(512), done=True))


def test_error_after_partial_structured_read_uses_error_offset() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 1024))
    events(s)
    s.send(n.ReadData(1, 0, bytes(512), done=False))
    s.send(n.ErrorReply(1, n.Errno.EIO, "disk on fire", offset=512))
    chunks = replies(joined(s))
    assert chunks[-1].chunk_type == n.ChunkType.ERROR_OFFSET and chunks[-1].flags == n.ReplyFlags.DONE
    assert chunks[-1].fields.offset == 512 and chunks[-1].fields.message == "disk on fire"


def test_error_after_partial_simple_read_cannot_be_sent() -> None:
    s = transmission("simple")
    s.receive_data(request(C.READ, 1, 0, 1024))
    events(s)
    s.send(n.ReadData(1, 0, bytes(512), done=False))
    with pytest.raises(n.LocalProtocolError, match="disconnect"):
        s.send(n.ErrorReply(1, n.Errno.EIO))


def test_replies_for_unknown_cookies_are_local_errors() -> None:
    s = transmission("simple")
    with pytest.raises(n.LocalProtocolError, match="cookie"):
        s.send(n.SuccessReply(5))


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_block_status_reply_per_context(mode: str) -> None:
    s = new_server()
    done = handshake(s, extended=mode == "extended", contexts=(n.BASE_ALLOCATION, "example:odd-blocks"))
    assert done.meta_contexts == {1: n.BASE_ALLOCATION, 2: "example:odd-blocks"}
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 8192, extended=mode == "extended"))
    (req,) = events(s)
    assert req == n.BlockStatusRequest(1, 0, 8192, n.NO_FLAGS, (1, 2))
    s.send(n.BlockStatusReply(1, {1: (n.Extent(4096, 0), n.Extent(1 << 20, 3)), 2: (n.Extent(8192, 1),)}))
    chunks = replies(joined(s))
    assert [c.flags for c in chunks] == [0, n.ReplyFlags.DONE]
    first = chunks[0].fields
    assert first.context_id == 1
    assert [(d.length, d.status) for d in first.descriptors] == [(4096, 0), (1 << 20, 3)]
    expected_type = n.ChunkType.BLOCK_STATUS_EXT if mode == "extended" else n.ChunkType.BLOCK_STATUS
    assert chunks[0].chunk_type == expected_type


def test_block_status_req_one_is_clamped_to_one_descriptor() -> None:
    s = new_server()
    handshake(s, contexts=(n.BASE_ALLOCATION,))
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 4096, F.REQ_ONE))
    events(s)
    s.send(n.BlockStatusReply(1, {1: (n.Extent(65536, 3), n.Extent(4096, 0))}))
    (chunk,) = replies(joined(s))
    assert [(d.length, d.status) for d in chunk.fields.descriptors] == [(4096, 3)]


def test_block_status_reply_must_cover_the_requested_contexts() -> None:
    s = new_server()
    handshake(s, contexts=(n.BASE_ALLOCATION,))
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 4096))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="contexts"):
        s.send(n.BlockStatusReply(1, {7: (n.Extent(4096, 0),)}))


def _advertised_flags(s: ServerConnection, go: bytes) -> int:
    """The transmission flags the server tells the client in its NBD_INFO_EXPORT reply to ``go`` (an option
    asking for an export the server's application then offers): the bytes on the wire, read by hand (spec:
    NBD_INFO_EXPORT is 16-bit type 0, 64-bit size, 16-bit flags)."""
    s.receive_data(go)
    (requested,) = events(s)
    assert isinstance(requested, n.ExportRequested)
    s.send(export())
    events(s)
    infos = [r.data for r in option_replies(joined(s)) if r.reply_type == R.INFO]
    (flags,) = [struct.unpack(">HQH", info)[2] for info in infos if info[:2] == b"\0\0"]
    return int(flags)


@pytest.mark.parametrize("contexts", [True, False])
@pytest.mark.parametrize("extended", [True, False])
def test_block_status_payload_is_advertised_with_extended_headers_and_contexts(extended: bool, contexts: bool) -> None:
    """NBD_FLAG_BLOCK_STAT_PAYLOAD (spec: only with extended headers; the payload chooses among the meta
    contexts agreed, so a server offers it where some were): in the flags the client receives."""
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXTENDED_HEADERS if extended else OPT.STRUCTURED_REPLY))
    assert events(s) == []
    if contexts:
        s.receive_data(option(OPT.SET_META_CONTEXT, meta_payload("disk", n.BASE_ALLOCATION)))
        assert events(s) == [n.ExportRequested("disk", OPT.SET_META_CONTEXT)]
        s.send(export())
    joined(s)
    flags = _advertised_flags(s, option(OPT.GO, info_payload("disk")))
    assert bool(flags & TF.BLOCK_STATUS_PAYLOAD) == (extended and contexts)
    assert flags & int(RW_FLAGS) == int(RW_FLAGS)


def test_extended_block_status_payload_filters_contexts() -> None:
    s = new_server()
    handshake(s, extended=True, contexts=(n.BASE_ALLOCATION, "example:odd-blocks"))
    payload = struct.pack(">QI", 8192, 2)
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, len(payload), F.PAYLOAD_LEN, extended=True) + payload)
    assert events(s) == [n.BlockStatusRequest(1, 0, 8192, n.NO_FLAGS, (2,))]
    bad = struct.pack(">QII", 8192, 2, 2)
    assert errors_of(s, request(C.BLOCK_STATUS, 2, 0, len(bad), F.PAYLOAD_LEN, extended=True) + bad) == [n.Errno.EINVAL]


def test_disconnect_waits_for_in_flight_replies() -> None:
    s = transmission("simple")
    s.receive_data(request(C.READ, 1, 0, 512) + request(C.DISC, 2) + request(C.READ, 3, 0, 512))
    assert events(s)[:2] == [n.ReadRequest(1, 0, 512), n.DisconnectRequest(2)]
    assert s.next_event() is n.PAUSED
    s.send(n.ReadData(1, 0, bytes(512)))
    assert isinstance(s.next_event(), n.ConnectionClosed)


def test_write_payload_is_a_zero_copy_view_of_received_bytes() -> None:
    s = transmission("simple")
    data = request(C.WRITE, 1, 0, 4096) + b"w" * 4096
    s.receive_data(data)
    (ev,) = events(s)
    assert isinstance(ev.data, memoryview) and ev.data.obj is data


def test_read_reply_data_is_queued_as_the_callers_buffer() -> None:
    s = transmission("structured")
    s.receive_data(request(C.READ, 1, 0, 4096))
    events(s)
    buffer = bytearray(4096)
    s.send(n.ReadData(1, 0, buffer))
    pieces = s.data_to_send()
    assert pieces[-1] is buffer


# --- Streams: pipelining, splitting, garbage -----------------------------------------------------------------


def request_stream(count: int) -> bytes:
    out = b""
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out += request(C.READ, i, (i * 512) % MIB, 512)
        elif kind == 1:
            out += request(C.WRITE, i, (i * 512) % MIB, 7) + bytes([i % 256]) * 7
        elif kind == 2:
            out += request(C.FLUSH, i)
        else:
            out += request(C.READ, i, MIB, 512)  # invalid: answered by the engine
    return out


def test_many_pipelined_requests_are_parsed_from_one_chunk() -> None:
    s = transmission("simple")
    s.receive_data(request_stream(400))
    got = events(s)
    assert len(got) == 300
    assert len(replies(joined(s))) == 100


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=200))
def test_split_streams_give_the_same_events(cuts: list[int]) -> None:
    stream = request_stream(40)
    whole = transmission("structured")
    whole.receive_data(stream)
    expected = [(type(e), getattr(e, "cookie", None)) for e in events(whole)]
    split = transmission("structured")
    got = []
    pos = 0
    for cut in cuts * 10:
        if pos >= len(stream):
            break
        split.receive_data(stream[pos : pos + cut])
        pos += cut
        got += [(type(e), getattr(e, "cookie", None)) for e in events(split)]
    if pos < len(stream):
        split.receive_data(stream[pos:])
    got += [(type(e), getattr(e, "cookie", None)) for e in events(split)]
    assert got == expected
    assert joined(split) == joined(whole)


def drive(s: ServerConnection, data: bytes) -> None:
    s.receive_data(data)
    for _ in range(1000):
        ev = s.next_event()
        if ev is n.NEED_DATA or ev is n.PAUSED or isinstance(ev, n.ConnectionClosed):
            return
        if isinstance(ev, n.ExportRequested):
            s.send(export(ev.name))
        elif isinstance(ev, n.StartTLS):
            s.tls_established()
        elif isinstance(ev, n.ReadRequest):
            s.send(n.ReadData(ev.cookie, ev.offset, bytes(ev.length)))
        elif isinstance(ev, n.BlockStatusRequest):
            s.send(n.BlockStatusReply(ev.cookie, {i: (n.Extent(ev.length, 0),) for i in ev.context_ids}))
        elif isinstance(ev, (n.WriteRequest, n.FlushRequest, n.TrimRequest, n.CacheRequest, n.WriteZeroesRequest)):
            s.send(n.SuccessReply(ev.cookie))
    raise AssertionError("the engine produced more than 1000 events from one chunk")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["greeting", "options", "simple", "structured", "extended"]))
def test_random_bytes_give_events_or_remote_protocol_error(garbage: bytes, phase: str) -> None:
    s = new_server(exports=["a"], tls=n.TlsMode.SELECTIVETLS)
    if phase == "options":
        s.receive_data(client_flags())
    elif phase != "greeting":
        contexts = () if phase == "simple" else (n.BASE_ALLOCATION,)
        handshake(s, structured=phase != "simple", extended=phase == "extended", contexts=contexts)
    try:
        drive(s, garbage)
        drive(s, b"")
    except n.RemoteProtocolError:
        assert s.phase is n.Phase.ERROR


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99]), max_size=12), st.binary(max_size=40))
def test_random_option_sequences_never_crash(codes: list[int], payload: bytes) -> None:
    s = new_server(exports=["a"], tls=n.TlsMode.SELECTIVETLS)
    try:
        drive(s, client_flags() + b"".join(option(c, payload if i % 2 else b"") for i, c in enumerate(codes)))
    except n.RemoteProtocolError:
        assert s.phase is n.Phase.ERROR


def test_set_meta_context_replaces_the_selection_even_when_it_fails() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY))
    events(s)
    s.receive_data(option(OPT.SET_META_CONTEXT, meta_payload("d", n.BASE_ALLOCATION)))
    events(s)
    s.send(export("d"))
    assert s.meta_contexts == {1: n.BASE_ALLOCATION}
    s.receive_data(option(OPT.SET_META_CONTEXT, meta_payload("d", "no-colon")))
    events(s)
    s.send(export("d"))
    assert s.meta_contexts == {}


def test_list_meta_context_with_no_match_is_a_lone_ack() -> None:
    s = new_server()
    s.receive_data(
        client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.LIST_META_CONTEXT, meta_payload("d", "x:y"))
    )
    events(s)
    option_replies(joined(s))
    s.send(export("d"))
    assert meta_replies(s) == ([], R.ACK)


def test_go_ack_has_no_zero_padding() -> None:
    s = new_server()
    s.receive_data(client_flags(n.ClientFlags.FIXED_NEWSTYLE) + option(OPT.GO, info_payload("d")))
    events(s)
    s.send(export("d"))
    got = option_replies(joined(s))
    assert got[-1].reply_type == R.ACK and got[-1].data == b""


def test_block_status_extents_must_respect_the_minimum_block_size() -> None:
    s = new_server()
    handshake(s, contexts=(n.BASE_ALLOCATION,), exp=export(minimum_block_size=512))
    s.receive_data(request(C.BLOCK_STATUS, 1, 0, 4096))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="multiple"):
        s.send(n.BlockStatusReply(1, {1: (n.Extent(100, 0), n.Extent(3996, 3))}))


def test_export_name_after_extended_headers_ends_the_connection() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXTENDED_HEADERS) + option(OPT.EXPORT_NAME, b"d"))
    with pytest.raises(n.RemoteProtocolError, match="extended headers"):
        s.next_event()
