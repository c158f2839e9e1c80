"""ServerConnection's option haggling against the spec's rules that test_server does not already cover: how
long the server keeps answering, TLS modes at their edges, block size advertisement, transmission flags, and
the information replies of NBD_OPT_INFO / NBD_OPT_GO (spec: "Option types", "Size constraints", "TLS
support", "Transmission flags")."""

from __future__ import annotations

import struct

import pytest

import nbdproto as n
import nbdproto.serving
import nbdproto.wire
from nbdproto.devices import MemoryDevice
from nbdproto.wire import layout as w
from tests.nbdbytes import client_flags, info_payload, joined, meta_payload, option, option_replies, request
from tests.test_server import RW_FLAGS, events, export, handshake, new_server

OPT, R, TF, INFO = n.Option, n.OptionReplyType, n.TransmissionFlags, n.InfoType
MIB = 1 << 20


def infos(replies: list[object]) -> dict[int, bytes]:
    """The NBD_REP_INFO payloads of an answer, by information type."""
    out = {}
    for reply in replies:
        if reply.reply_type == R.INFO:  # type: ignore[attr-defined]
            data = reply.data  # type: ignore[attr-defined]
            out[struct.unpack(">H", data[:2])[0]] = data
    return out


def ask(s: n.ServerConnection, data: bytes, answer: object = None) -> list[object]:
    """Send option bytes; answer an ExportRequested with ``answer``; the option replies that came back."""
    s.receive_data(data)
    got = events(s)
    if got and isinstance(got[-1], n.ExportRequested):
        s.send(answer if answer is not None else export(got[-1].name))  # type: ignore[arg-type]
        got = events(s)
    return option_replies(joined(s))  # type: ignore[return-value]


# --- Ending the session --------------------------------------------------------------------------------------


def test_the_server_keeps_answering_a_client_that_gets_everything_wrong() -> None:
    # spec: the server MUST simply error options until the client gets the hint; it closes only where it
    # cannot answer or the client broke a rule.
    s = new_server(exports=["disk"])
    s.receive_data(client_flags())
    wrong = [
        option(99, b"junk"),
        option(OPT.LIST, b"data"),
        option(OPT.STARTTLS),
        option(OPT.SET_META_CONTEXT, meta_payload("disk", n.BASE_ALLOCATION)),
        option(OPT.GO, b"\xff\xff"),
        option(OPT.STRUCTURED_REPLY, b"x"),
        option(OPT.PEEK_EXPORT),
    ]
    for _ in range(20):
        for data in wrong:
            s.receive_data(data)
            assert events(s) == []
    got = option_replies(joined(s))
    assert len(got) == 20 * len(wrong) and all(R(x.reply_type).is_error for x in got)
    s.receive_data(option(OPT.GO, info_payload("disk")))
    events(s)
    s.send(export())
    assert isinstance(s.next_event(), n.HandshakeComplete)


def test_abort_then_close_at_once_is_clean() -> None:
    # spec: the server SHOULD handle a client that sends NBD_OPT_ABORT and closes without waiting.
    s = new_server()
    s.receive_data(client_flags() + option(OPT.ABORT))
    s.receive_data(b"")
    assert isinstance(s.next_event(), n.ClientAborted)
    assert isinstance(s.next_event(), n.ConnectionClosed)
    assert s.phase is n.Phase.CLOSED


# --- TLS modes -------------------------------------------------------------------------------------------------


def test_selectivetls_refuses_a_second_starttls() -> None:
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    s.receive_data(client_flags() + option(OPT.STARTTLS))
    assert isinstance(s.next_event(), n.StartTLS)
    s.tls_established()
    assert [x.reply_type for x in ask(s, option(OPT.STARTTLS))] == [R.ACK, R.ERR_INVALID]


def test_selectivetls_export_name_of_a_tls_only_export_closes() -> None:
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    s.receive_data(client_flags() + option(OPT.EXPORT_NAME, b"secret"))
    events(s)
    s.send(export("secret", tls_required=True))
    assert isinstance(s.next_event(), n.ConnectionClosed)
    assert joined(s) == b""


@pytest.mark.parametrize("code", [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT])
def test_selectivetls_meta_contexts_of_a_tls_only_export_are_refused_by_policy(code: n.Option) -> None:
    # spec: NBD_REP_ERR_TLS_REQD answers only INFO, GO (and EXPORT_NAME closes), never other options.
    s = new_server(tls=n.TlsMode.SELECTIVETLS)
    got = ask(
        s,
        client_flags() + option(OPT.STRUCTURED_REPLY) + option(code, meta_payload("secret")),
        export("secret", tls_required=True),
    )
    assert [x.reply_type for x in got] == [R.ACK, R.ERR_POLICY]  # type: ignore[attr-defined]
    s.receive_data(option(code, meta_payload("secret")))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="TLS_REQD"):
        s.send(n.ExportUnknown("tls", R.ERR_TLS_REQD))


def test_a_client_without_fixed_newstyle_never_gets_tls() -> None:
    # spec: TLS needs fixed newstyle on both sides; a FORCEDTLS server cannot serve such a client in the clear,
    # so its NBD_OPT_EXPORT_NAME ends the session (it cannot be refused otherwise).
    for data in (option(OPT.EXPORT_NAME, b"disk"), option(OPT.STARTTLS)):
        s = new_server(tls=n.TlsMode.FORCEDTLS)
        s.receive_data(client_flags(0) + data)
        with pytest.raises(n.RemoteProtocolError):
            s.next_event()
        assert not s.tls_active


# --- Block sizes -----------------------------------------------------------------------------------------------


def test_default_block_sizes() -> None:
    exp = n.serving.export_for("d", MIB, MemoryDevice(MIB).capabilities)
    assert (exp.minimum_block_size, exp.preferred_block_size, exp.maximum_payload) == (1, 4096, 32 * MIB)
    s = new_server()
    got = ask(s, client_flags() + option(OPT.INFO, info_payload("d", INFO.BLOCK_SIZE)), exp)
    sizes = w.decode(w.InfoBlockSizePayload, infos(got)[INFO.BLOCK_SIZE])
    assert (sizes.minimum, sizes.preferred, sizes.maximum) == (1, 4096, 32 * MIB)


def test_default_sizes_never_need_the_block_size_request() -> None:
    # spec: no NBD_REP_ERR_BLOCK_SIZE_REQD with default sizes; nothing unasked is sent either.
    for code in (OPT.INFO, OPT.GO):
        s = new_server()
        got = ask(s, client_flags() + option(code, info_payload("d")))
        assert [x.reply_type for x in got] == [R.INFO, R.ACK]  # type: ignore[attr-defined]
        assert list(infos(got)) == [INFO.EXPORT]
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXPORT_NAME, b"d"))
    events(s)
    s.send(export("d"))
    assert isinstance(s.next_event(), n.HandshakeComplete)


@pytest.mark.parametrize(
    "sizes", [{"preferred_block_size": 65536}, {"maximum_payload": MIB}, {"minimum_block_size": 512}]
)
def test_non_default_sizes_are_advertised_whether_asked_or_not(sizes: dict[str, int]) -> None:
    exp = export("d", **sizes)
    # Asked for: never NBD_REP_ERR_BLOCK_SIZE_REQD.
    s = new_server()
    got = ask(s, client_flags() + option(OPT.GO, info_payload("d", INFO.BLOCK_SIZE)), exp)
    assert R.ERR_BLOCK_SIZE_REQD not in [x.reply_type for x in got]  # type: ignore[attr-defined]
    assert INFO.BLOCK_SIZE in infos(got) and s.phase is n.Phase.TRANSMISSION
    # Not asked for: sent anyway (a minimum above 1 is then refused, with the sizes first).
    s = new_server()
    got = ask(s, client_flags() + option(OPT.GO, info_payload("d")), exp)
    assert INFO.BLOCK_SIZE in infos(got)
    last = got[-1].reply_type  # type: ignore[attr-defined]
    assert last == (R.ERR_BLOCK_SIZE_REQD if "minimum_block_size" in sizes else R.ACK)


def test_sizes_sent_unasked_are_still_enforced() -> None:
    # spec: the server MUST NOT assume unrequested information was understood.
    s = new_server()
    ask(s, client_flags() + option(OPT.GO, info_payload("d")), export("d", size=4 * MIB, maximum_payload=MIB))
    assert s.phase is n.Phase.TRANSMISSION
    s.receive_data(request(n.Command.READ, 1, 0, 2 * MIB))
    assert events(s) == []
    assert joined(s)[4:8] == struct.pack(">I", n.Errno.EINVAL)


@pytest.mark.parametrize(
    "sizes",
    [
        {"minimum_block_size": 3},
        {"minimum_block_size": 1 << 17, "preferred_block_size": 1 << 17},
        {"preferred_block_size": 256},
        {"minimum_block_size": 4096, "preferred_block_size": 2048},
        {"preferred_block_size": 4096, "maximum_payload": 2048},
        {"maximum_payload": 1 << 32},
    ],
)
def test_invalid_block_sizes_are_a_local_error(sizes: dict[str, int]) -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.INFO, info_payload("d", INFO.BLOCK_SIZE)))
    events(s)
    with pytest.raises(n.LocalProtocolError, match=r"block size|maximum payload"):
        s.send(export("d", **sizes))


def test_device_capabilities_refuse_a_preferred_size_below_512() -> None:
    with pytest.raises(ValueError, match="preferred"):
        n.DeviceCapabilities(preferred_block_size=256)


def test_structured_reads_fit_one_data_chunk() -> None:
    # spec: a structured (not extended) OFFSET_DATA chunk's 32-bit length counts the offset too, so a read of
    # more than 2^32 - 9 bytes could not be one chunk: the maximum payload advertised is held below that.
    exp = export("d", size=1 << 40, maximum_payload=0xFFFFFFFF)
    for structured, extended, maximum in ((False, False, 0xFFFFFFFF), (True, False, 0xFFFFFFF7), (True, True, None)):
        s = new_server()
        data = client_flags()
        if extended:
            data += option(OPT.EXTENDED_HEADERS)
        elif structured:
            data += option(OPT.STRUCTURED_REPLY)
        got = ask(s, data + option(OPT.GO, info_payload("d", INFO.BLOCK_SIZE)), exp)
        advertised = w.decode(w.InfoBlockSizePayload, infos(got)[INFO.BLOCK_SIZE]).maximum
        assert advertised == (maximum or 0xFFFFFFFF)
        if structured and not extended:
            s.receive_data(request(n.Command.READ, 1, 0, 0xFFFFFFF8))
            assert events(s) == []
            magic, _, kind, cookie, _, error, _ = struct.unpack(">IHHQIIH", joined(s)[:26])
            assert (magic, kind, cookie, error) == (
                n.wire.STRUCTURED_REPLY_MAGIC,
                n.ChunkType.ERROR,
                1,
                n.Errno.EOVERFLOW,
            )


# --- Transmission flags and information replies --------------------------------------------------------------


def test_transmission_flags_follow_what_was_negotiated() -> None:
    # spec: HAS_FLAGS always; DF only with structured replies; FAST_ZERO never without WRITE_ZEROES;
    # BLOCK_STATUS_PAYLOAD only with extended headers and a meta context for this export.
    odd = TF.SEND_FAST_ZERO | TF.BLOCK_STATUS_PAYLOAD | TF.SEND_DF | TF.READ_ONLY
    for mode, contexts in (("simple", ()), ("structured", (n.BASE_ALLOCATION,)), ("extended", ())):
        s = new_server()
        handshake(s, structured=mode != "simple", extended=mode == "extended", contexts=contexts, exp=export(flags=odd))
        flags = s._flags
        assert flags & TF.HAS_FLAGS and not flags & (TF.SEND_FAST_ZERO | TF.BLOCK_STATUS_PAYLOAD)
        assert bool(flags & TF.SEND_DF) == (mode != "simple")
    s = new_server()
    handshake(s, extended=True, contexts=(n.BASE_ALLOCATION,), exp=export(flags=RW_FLAGS))
    assert s._flags & TF.BLOCK_STATUS_PAYLOAD and s._flags & TF.SEND_FAST_ZERO


def test_go_right_after_info_repeats_the_same_information() -> None:
    s = new_server()
    exp = export("d", description="the disk", maximum_payload=MIB)
    payload = info_payload("d", INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE)
    info = ask(s, client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.INFO, payload), exp)
    go = ask(s, option(OPT.GO, payload), exp)
    assert infos(info[1:]) == infos(go) and len(infos(go)) == 4


def test_each_information_type_is_sent_once() -> None:
    s = new_server()
    payload = info_payload("d", INFO.NAME, INFO.NAME, INFO.BLOCK_SIZE, INFO.BLOCK_SIZE, INFO.EXPORT)
    got = ask(s, client_flags() + option(OPT.INFO, payload), export("d", description="x"))
    kinds = [struct.unpack(">H", x.data[:2])[0] for x in got[:-1]]  # type: ignore[attr-defined]
    assert sorted(kinds) == [INFO.EXPORT, INFO.NAME, INFO.BLOCK_SIZE]


def test_information_payload_lengths() -> None:
    s = new_server()
    payload = info_payload("", INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE)
    got = infos(ask(s, client_flags() + option(OPT.INFO, payload), export("", description="x")))
    assert len(got[INFO.EXPORT]) == 12 and len(got[INFO.BLOCK_SIZE]) == 14
    assert len(got[INFO.NAME]) == 2 and len(got[INFO.DESCRIPTION]) == 3


def test_go_is_never_unsupported_after_extended_headers() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXTENDED_HEADERS) + option(OPT.GO, info_payload("d")))
    events(s)
    with pytest.raises(n.LocalProtocolError, match="extended headers"):
        s.send(n.ExportUnknown("no GO here", R.ERR_UNSUP))


def test_extended_headers_need_no_structured_replies_first() -> None:
    s = new_server()
    assert [x.reply_type for x in ask(s, client_flags() + option(OPT.EXTENDED_HEADERS))] == [R.ACK]
    assert s.extended_headers and s.structured_replies


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\0\0\x05abc",  # name longer than the data
        struct.pack(">I", 1) + b"d" + struct.pack(">II", 2, 40) + b"base:",  # query longer than the data
        struct.pack(">I", 1) + b"d" + struct.pack(">I", 1),  # a query count with no query
        b"\0\0",
    ],
)
def test_malformed_meta_context_requests_are_invalid(payload: bytes) -> None:
    s = new_server()
    got = ask(s, client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.LIST_META_CONTEXT, payload))
    assert [x.reply_type for x in got] == [R.ACK, R.ERR_INVALID]  # type: ignore[attr-defined]
