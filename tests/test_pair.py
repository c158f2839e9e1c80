"""ClientConnection and ServerConnection against each other: every option, command, flag and reply form, in
every TLS mode, with simple replies, structured replies and extended headers; then the client alone against
a misbehaving server (raw bytes) and against random bytes."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
import nbdproto.wire
from nbdproto.wire import headers as h
from nbdproto.wire import layout as w

TF, F, OPT = n.TransmissionFlags, n.CommandFlags, n.Option
ALL_FLAGS = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO) | (
    TF.SEND_CACHE | TF.SEND_RESIZE
)
MIB = 1 << 20


class Disk:
    """What the server side of a pair serves: a bytearray, with holes where it was never written."""

    def __init__(self, size: int = MIB) -> None:
        self.data = bytearray(size)
        self.export = n.Export("disk", size, ALL_FLAGS, "pair disk", meta_contexts=(n.BASE_ALLOCATION, "x:odd"))


class Pair:
    def __init__(self, tls: n.TlsMode = n.TlsMode.NOTLS, server_kw: dict[str, Any] | None = None) -> None:
        self.server = n.ServerConnection(exports=["disk"], tls=tls, **(server_kw or {}))
        self.client = n.ClientConnection()
        self.disk = Disk()
        self.server_events: list[object] = []
        self.hole_reads = False

    def pump(self) -> None:
        for _ in range(200):
            moved = False
            for src, dst in ((self.server, self.client), (self.client, self.server)):
                data = b"".join(bytes(p) for p in src.data_to_send())
                if data:
                    dst.receive_data(data)
                    moved = True
            self.serve()
            if not moved:
                return

    def serve(self) -> None:
        s, disk = self.server, self.disk
        while True:
            ev = s.next_event()
            if ev is n.NEED_DATA or ev is n.PAUSED or isinstance(ev, n.ConnectionClosed):
                return
            self.server_events.append(ev)
            if isinstance(ev, n.ExportRequested):
                s.send(disk.export if ev.name == "disk" else n.ExportUnknown(f"no {ev.name}"))
            elif isinstance(ev, n.StartTLS):
                pass  # the test completes the upgrade on both sides
            elif isinstance(ev, n.ReadRequest):
                data = bytes(disk.data[ev.offset : ev.offset + ev.length])
                if self.hole_reads and s.structured_replies and not ev.flags & F.DF and ev.length >= 2:
                    half = ev.length // 2
                    s.send(n.ReadHole(ev.cookie, ev.offset, half))  # the first half reads as zero here
                    s.send(n.ReadData(ev.cookie, ev.offset + half, data[half:]))
                else:
                    s.send(n.ReadData(ev.cookie, ev.offset, data))
            elif isinstance(ev, n.WriteRequest):
                disk.data[ev.offset : ev.offset + len(ev.data)] = ev.data
                s.send(n.SuccessReply(ev.cookie))
            elif isinstance(ev, (n.TrimRequest, n.WriteZeroesRequest)):
                disk.data[ev.offset : ev.offset + ev.length] = bytes(ev.length)
                s.send(n.SuccessReply(ev.cookie))
            elif isinstance(ev, n.BlockStatusRequest):
                s.send(n.BlockStatusReply(ev.cookie, {i: (n.Extent(ev.length, i),) for i in ev.context_ids}))
            elif isinstance(ev, n.ResizeRequest):
                s.send(n.ErrorReply(ev.cookie, n.Errno.EPERM, "fixed size"))
            elif isinstance(ev, (n.FlushRequest, n.CacheRequest)):
                s.send(n.SuccessReply(ev.cookie))

    def events(self) -> list[object]:
        out = []
        while True:
            ev = self.client.next_event()
            if ev is n.NEED_DATA or ev is n.PAUSED:
                return out
            out.append(ev)
            if isinstance(ev, n.ConnectionClosed):
                return out

    def ask(self, event: object) -> list[object]:
        self.client.send(event)  # type: ignore[arg-type]
        self.pump()
        return self.events()

    def start(self) -> n.ServerGreeting:
        self.pump()
        (greeting,) = self.events()
        assert isinstance(greeting, n.ServerGreeting)
        return greeting

    def connect(self, mode: str, contexts: tuple[str, ...] = (n.BASE_ALLOCATION,)) -> n.HandshakeComplete:
        self.start()
        if mode == "structured":
            assert self.ask(n.OptionStructuredReply()) == [n.OptionAck(OPT.STRUCTURED_REPLY)]
        elif mode == "extended":
            assert self.ask(n.OptionExtendedHeaders()) == [n.OptionAck(OPT.EXTENDED_HEADERS)]
        if mode != "simple" and contexts:
            (got,) = self.ask(n.OptionSetMetaContext("disk", contexts))
            assert isinstance(got, n.MetaContexts) and sorted(got.contexts.values()) == sorted(contexts)
        (done,) = self.ask(n.OptionGo("disk", (n.InfoType.BLOCK_SIZE, n.InfoType.DESCRIPTION, n.InfoType.NAME)))
        assert isinstance(done, n.HandshakeComplete)
        assert self.client.phase is n.Phase.TRANSMISSION
        return done


@pytest.fixture(params=["simple", "structured", "extended"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(mode: str) -> Iterator[Pair]:
    p = Pair()
    p.connect(mode)
    yield p


# --- Handshake ----------------------------------------------------------------------------------------------


def test_every_option_ends_in_exactly_one_event() -> None:
    p = Pair()
    assert p.start().handshake_flags == n.HandshakeFlags.FIXED_NEWSTYLE | n.HandshakeFlags.NO_ZEROES
    assert p.ask(n.OptionList()) == [n.ExportList((n.ExportListing("disk"),))]
    assert p.ask(n.OptionRaw(99, b"x")) == [
        n.OptionError(99, n.OptionReplyType.ERR_UNSUP, "option 99 is not supported")
    ]
    assert p.ask(n.OptionStartTLS()) == [
        n.OptionError(OPT.STARTTLS, n.OptionReplyType.ERR_POLICY, "this server does not offer TLS")
    ]
    (info,) = p.ask(n.OptionInfo("disk", (n.InfoType.DESCRIPTION, n.InfoType.BLOCK_SIZE)))
    assert isinstance(info, n.ExportInfo)
    assert (info.export.size, info.export.description, info.export.block_sizes_known) == (MIB, "pair disk", True)
    (unknown,) = p.ask(n.OptionGo("nope"))
    assert isinstance(unknown, n.OptionError) and unknown.reply_type == n.OptionReplyType.ERR_UNKNOWN
    assert p.ask(n.OptionStructuredReply()) == [n.OptionAck(OPT.STRUCTURED_REPLY)]
    (listed,) = p.ask(n.OptionListMetaContext("disk", ("x:",)))
    assert listed == n.MetaContexts(OPT.LIST_META_CONTEXT, {0: "x:odd"})
    (chosen,) = p.ask(n.OptionSetMetaContext("disk", ("x:odd",)))
    assert isinstance(chosen, n.MetaContexts) and list(chosen.contexts.values()) == ["x:odd"]
    (done,) = p.ask(n.OptionGo("disk"))
    assert isinstance(done, n.HandshakeComplete) and list(done.meta_contexts.values()) == ["x:odd"]
    assert done.export.flags & TF.SEND_DF and not done.export.read_only


def test_info_without_block_size_reports_defaults_unknown() -> None:
    p = Pair()
    p.start()
    (info,) = p.ask(n.OptionInfo("disk"))
    assert isinstance(info, n.ExportInfo) and info.export.block_sizes_known is False


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_with_and_without_zeroes(no_zeroes: bool) -> None:
    p = Pair()
    p.client = n.ClientConnection(no_zeroes=no_zeroes)
    p.start()
    (done,) = p.ask(n.OptionExportName("disk"))
    assert isinstance(done, n.HandshakeComplete) and done.export.size == MIB


def test_export_name_refused_is_a_remote_error() -> None:
    p = Pair()
    p.start()
    p.client.send(n.OptionExportName("nope"))
    p.pump()
    p.client.receive_data(b"")
    with pytest.raises(n.RemoteProtocolError, match="refused export"):
        p.events()


def test_abort_ends_with_client_aborted_on_both_sides() -> None:
    p = Pair()
    p.start()
    assert p.ask(n.OptionAbort()) == [n.ClientAborted(), n.ConnectionClosed()]
    assert any(isinstance(e, n.ClientAborted) for e in p.server_events)


def test_extended_headers_forbid_export_name() -> None:
    p = Pair()
    p.start()
    p.ask(n.OptionExtendedHeaders())
    with pytest.raises(n.LocalProtocolError, match="EXPORT_NAME"):
        p.client.send(n.OptionExportName("disk"))


def test_only_one_option_at_a_time() -> None:
    p = Pair()
    p.start()
    p.client.send(n.OptionList())
    with pytest.raises(n.LocalProtocolError, match="waiting"):
        p.client.send(n.OptionList())


@pytest.mark.parametrize("tls", [n.TlsMode.FORCEDTLS, n.TlsMode.SELECTIVETLS])
def test_starttls_then_negotiation_starts_over(tls: n.TlsMode) -> None:
    p = Pair(tls=tls)
    p.start()
    if tls is n.TlsMode.FORCEDTLS:
        (refused,) = p.ask(n.OptionList())
        assert isinstance(refused, n.OptionError) and refused.reply_type == n.OptionReplyType.ERR_TLS_REQD
    else:
        assert p.ask(n.OptionStructuredReply()) == [n.OptionAck(OPT.STRUCTURED_REPLY)]
    assert p.ask(n.OptionStartTLS()) == [n.StartTLS()]
    assert p.client.phase is n.Phase.TLS_UPGRADE and p.server.phase is n.Phase.TLS_UPGRADE
    p.client.tls_established()
    p.server.tls_established()
    assert not p.client.structured_replies and p.client.tls_active
    with pytest.raises(n.LocalProtocolError, match="already active"):
        n.ClientConnection.send(p.client, n.OptionStartTLS())
    p2 = Pair(tls=tls)
    p2.start()
    p2.ask(n.OptionStartTLS())
    p2.client.tls_established()
    p2.server.tls_established()
    (done,) = p2.ask(n.OptionGo("disk"))
    assert isinstance(done, n.HandshakeComplete)


def test_plaintext_after_starttls_ack_is_refused_by_the_client() -> None:
    c = n.ClientConnection()
    c.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 3}))
    c.next_event()
    c.send(n.OptionStartTLS())
    ack = h.OPTION_REPLY.pack(h.OPTION_REPLY.magic, OPT.STARTTLS, n.OptionReplyType.ACK, 0)
    c.receive_data(ack + b"injected")
    with pytest.raises(n.RemoteProtocolError, match="plaintext"):
        c.next_event()


def test_oldstyle_server_goes_straight_to_transmission() -> None:
    c = n.ClientConnection()
    c.receive_data(w.encode(w.OldstyleGreeting, {"size": MIB, "flags": TF.HAS_FLAGS | TF.SEND_FLUSH}))
    greeting, done = c.next_event(), c.next_event()
    assert greeting == n.ServerGreeting(0, oldstyle=True)
    assert isinstance(done, n.HandshakeComplete) and done.export.size == MIB
    c.send(n.FlushRequest(1))
    assert h.REQUEST.unpack_from(bytes(c.data_to_send()[0]))[2] == n.Command.FLUSH


def test_nonfixed_newstyle_server_only_takes_export_name() -> None:
    c = n.ClientConnection()
    c.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 0}))
    c.next_event()
    assert c.data_to_send() == [struct.pack(">I", 0)]
    with pytest.raises(n.LocalProtocolError, match="EXPORT_NAME"):
        c.send(n.OptionList())


# --- Transmission -------------------------------------------------------------------------------------------


def test_every_command_round_trips(pair: Pair, mode: str) -> None:
    p = pair
    assert p.ask(n.WriteRequest(1, 4096, b"hello", F.FUA)) == [n.SuccessReply(1)]
    (read,) = p.ask(n.ReadRequest(2, 4096, 5))
    assert isinstance(read, n.ReadReply) and bytes(read.data) == b"hello"
    assert p.ask(n.FlushRequest(3)) == [n.SuccessReply(3)]
    assert p.ask(n.TrimRequest(4, 4096, 4096, F.FUA)) == [n.SuccessReply(4)]
    assert p.ask(n.CacheRequest(5, 0, 8192)) == [n.SuccessReply(5)]
    zero_flags = F.NO_HOLE | F.FAST_ZERO | F.FUA
    assert p.ask(n.WriteZeroesRequest(6, 0, 4096, zero_flags)) == [n.SuccessReply(6)]
    (resize,) = p.ask(n.ResizeRequest(7, 2 * MIB))
    assert isinstance(resize, n.ErrorReply) and resize.error == n.Errno.EPERM
    if mode != "simple":
        (status,) = p.ask(n.BlockStatusRequest(8, 0, 8192))
        assert status == n.BlockStatusReply(8, {1: (n.Extent(8192, 1),)})
        (one,) = p.ask(n.BlockStatusRequest(9, 0, 8192, F.REQ_ONE))
        assert isinstance(one, n.BlockStatusReply)
        (df,) = p.ask(n.ReadRequest(10, 4096, 5, F.DF))
        assert isinstance(df, n.ReadReply) and bytes(df.data) == bytes(5)
    p.client.send(n.DisconnectRequest())
    p.pump()
    assert any(isinstance(e, n.DisconnectRequest) for e in p.server_events)


def test_read_into_the_callers_buffer_across_holes(mode: str) -> None:
    p = Pair()
    p.connect(mode)
    p.hole_reads = True
    p.disk.data[0:8192] = b"\x07" * 8192
    buffer = bytearray(b"\xff" * 8192)
    (reply,) = p.ask(n.ReadRequest(1, 0, 8192, buffer=buffer))
    assert isinstance(reply, n.ReadReply) and reply.data.obj is buffer
    expected = bytes(4096) + b"\x07" * 4096 if mode != "simple" else b"\x07" * 8192
    assert bytes(buffer) == expected


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["simple", "structured", "extended"]),
    st.booleans(),
    st.lists(st.integers(1, 5000), min_size=1, max_size=40),
)
def test_read_payloads_received_straight_into_the_buffer(mode: str, holes: bool, cuts: list[int]) -> None:
    """A driver that recv_into()s read_buffer() gets the same replies, in the caller's buffers, as one that
    passes every byte to receive_data, however the bytes are cut; arriving_read_size names the read's length
    while its data arrives there."""
    p = Pair()
    p.connect(mode)
    p.hole_reads = holes
    p.disk.data[:] = bytes(range(256)) * (MIB // 256)
    buffers = {cookie: bytearray(b"\xee" * 6144) for cookie in (1, 2, 3)}
    for cookie, buffer in buffers.items():
        p.client.send(n.ReadRequest(cookie, cookie * 4096, 6144, buffer=buffer))
    p.server.receive_data(b"".join(bytes(piece) for piece in p.client.data_to_send()))
    p.serve()
    stream = memoryview(b"".join(bytes(piece) for piece in p.server.data_to_send()))
    client, replies, at, turn = p.client, [], 0, 0
    while at < len(stream):
        size = min(cuts[turn % len(cuts)], len(stream) - at)
        turn += 1
        target = client.read_buffer()
        assert client.arriving_read_size == (0 if target is None else 6144)  # the read's length, while it arrives
        if target is not None:
            size = min(size, len(target))
            target[:size] = stream[at : at + size]  # what recv_into would do
            client.received_into(size)
        else:
            client.receive_data(stream[at : at + size])
        at += size
        replies += [e for e in iter(client.next_event, n.NEED_DATA)]
    assert client.read_buffer() is None and client.in_flight == 0
    assert sorted(r.cookie for r in replies) == [1, 2, 3]
    for reply in replies:
        assert isinstance(reply, n.ReadReply) and reply.data.obj is buffers[reply.cookie]
        expected = bytes(p.disk.data[reply.cookie * 4096 : reply.cookie * 4096 + 6144])
        if holes and mode != "simple":
            expected = bytes(3072) + expected[3072:]
        assert bytes(buffers[reply.cookie]) == expected


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
def test_server_closing_inside_a_direct_read_payload_is_a_remote_error(mode: str) -> None:
    p = Pair()
    p.connect(mode)
    p.client.send(n.ReadRequest(1, 0, 4096))
    p.server.receive_data(b"".join(bytes(piece) for piece in p.client.data_to_send()))
    p.serve()
    stream = b"".join(bytes(piece) for piece in p.server.data_to_send())
    p.client.receive_data(stream[: len(stream) - 100])
    assert p.client.next_event() is n.NEED_DATA and p.client.read_buffer() is not None
    p.client.received_into(0)
    with pytest.raises(n.RemoteProtocolError, match="middle of a reply"):
        p.client.next_event()


def test_received_into_must_fit_the_read_buffer() -> None:
    client, _ = connected_client("structured")
    assert client.read_buffer() is None
    with pytest.raises(n.LocalProtocolError):
        client.received_into(10)


def test_many_in_flight_replies_in_any_order(mode: str) -> None:
    p = Pair()
    p.connect(mode)
    for i in range(64):
        p.disk.data[i * 512 : i * 512 + 512] = bytes([i]) * 512
    for i in range(64):
        p.client.send(n.ReadRequest(1000 + i, i * 512, 512))
    assert p.client.in_flight == 64
    # The server answers in reverse order.
    p.server.receive_data(b"".join(bytes(x) for x in p.client.data_to_send()))
    requests = [e for e in iter(p.server.next_event, n.NEED_DATA) if isinstance(e, n.ReadRequest)]
    for ev in reversed(requests):
        p.server.send(n.ReadData(ev.cookie, ev.offset, bytes(p.disk.data[ev.offset : ev.offset + ev.length])))
    p.client.receive_data(b"".join(bytes(x) for x in p.server.data_to_send()))
    replies = p.events()
    assert [r.cookie for r in replies] == [1000 + i for i in reversed(range(64))]  # type: ignore[attr-defined]
    assert all(bytes(r.data) == bytes([r.cookie - 1000]) * 512 for r in replies)  # type: ignore[attr-defined]
    assert p.client.in_flight == 0


def test_server_errors_reach_the_caller_with_their_values(mode: str) -> None:
    p = Pair()
    p.connect(mode)
    p.client.send(n.ReadRequest(1, 0, 512))
    p.server.receive_data(b"".join(bytes(x) for x in p.client.data_to_send()))
    (ev,) = [e for e in iter(p.server.next_event, n.NEED_DATA)]
    p.server.send(n.ErrorReply(ev.cookie, n.Errno.EIO, "disk on fire", offset=0 if mode != "simple" else None))
    p.client.receive_data(b"".join(bytes(x) for x in p.server.data_to_send()))
    (err,) = p.events()
    assert isinstance(err, n.ErrorReply) and err.error == n.Errno.EIO
    if mode != "simple":
        assert err.message == "disk on fire" and err.offset == 0


def test_extended_block_status_can_choose_contexts() -> None:
    p = Pair()
    p.connect("extended", contexts=(n.BASE_ALLOCATION, "x:odd"))
    ids = dict((name, i) for i, name in p.client.meta_contexts.items())
    (reply,) = p.ask(n.BlockStatusRequest(1, 0, 4096, n.NO_FLAGS, (ids["x:odd"],)))
    assert reply == n.BlockStatusReply(1, {ids["x:odd"]: (n.Extent(4096, ids["x:odd"]),)})


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (n.ReadRequest(1, MIB, 512), "past the export size"),
        (n.ReadRequest(1, 0, 0), "of length 0"),
        (n.ReadRequest(1, 0, 512, F.NO_HOLE), "not valid"),
        (n.WriteRequest(1, 0, b"x", F.NO_HOLE), "not valid"),
        (n.BlockStatusRequest(1, 0, 512, n.NO_FLAGS, (77,)), "agreed"),
        (n.ReadRequest(1, 0, 512, F.PAYLOAD_LEN), "PAYLOAD_LEN"),
        (n.ReadRequest(1, 0, 512, buffer=bytearray(10)), "buffer"),
    ],
)
def test_client_rule_breaking_is_a_local_error(event: Any, match: str) -> None:
    p = Pair()
    p.connect("structured")
    with pytest.raises(n.LocalProtocolError, match=match):
        p.client.send(event)
    # Nothing was sent or remembered: the connection goes on.
    assert p.client.data_to_send() == [] and p.client.in_flight == 0
    assert p.client.phase is n.Phase.TRANSMISSION
    (reply,) = p.ask(n.ReadRequest(2, 0, 512))
    assert isinstance(reply, n.ReadReply)


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (n.FlushRequest(1), "FLUSH"),
        (n.WriteRequest(2, 0, b"x"), "read-only"),
        (n.TrimRequest(3, 0, 512), "TRIM"),
        (n.CacheRequest(4, 0, 512), "CACHE"),
        (n.BlockStatusRequest(5, 0, 512), "meta context"),
    ],
)
def test_unadvertised_features_and_read_only_are_refused_locally(event: Any, match: str) -> None:
    p = Pair()
    p.disk.export = n.Export("disk", MIB)  # read-only, nothing advertised
    p.connect("structured", contexts=())
    with pytest.raises(n.LocalProtocolError, match=match):
        p.client.send(event)


def test_cookie_reuse_while_in_flight_is_a_local_error() -> None:
    p = Pair()
    p.connect("simple")
    p.client.send(n.ReadRequest(1, 0, 512))
    with pytest.raises(n.LocalProtocolError, match="in flight"):
        p.client.send(n.ReadRequest(1, 512, 512))


# --- A misbehaving server -----------------------------------------------------------------------------------


def connected_client(mode: str) -> tuple[n.ClientConnection, int]:
    """A client in transmission with one 1024-byte read (cookie 5, offset 4096) in flight."""
    p = Pair()
    p.connect(mode)
    p.client.send(n.ReadRequest(5, 4096, 1024))
    p.client.data_to_send()
    return p.client, 5


def chunk(mode: str, flags: int, kind: int, cookie: int, payload: bytes, offset: int = 4096) -> bytes:
    if mode == "extended":
        return h.EXTENDED_REPLY.pack(h.EXTENDED_REPLY.magic, flags, kind, cookie, offset, len(payload)) + payload
    return h.STRUCTURED_REPLY.pack(h.STRUCTURED_REPLY.magic, flags, kind, cookie, len(payload)) + payload


def data_chunk(mode: str, flags: int, cookie: int, at: int, data: bytes) -> bytes:
    return chunk(mode, flags, n.ChunkType.OFFSET_DATA, cookie, struct.pack(">Q", at) + data)


DONE = n.ReplyFlags.DONE
VIOLATIONS = {
    "unknown cookie": lambda m: data_chunk(m, DONE, 99, 4096, bytes(1024)),
    "outside the request": lambda m: data_chunk(m, DONE, 5, 8192, bytes(1024)),
    "overlap": lambda m: data_chunk(m, 0, 5, 4096, bytes(600)) + data_chunk(m, DONE, 5, 4096 + 512, bytes(512)),
    "missing data": lambda m: data_chunk(m, 0, 5, 4096, bytes(512)) + chunk(m, DONE, 0, 5, b""),
    "data after done": lambda m: data_chunk(m, DONE, 5, 4096, bytes(1024)) + data_chunk(m, DONE, 5, 4096, b"x"),
    "error zero": lambda m: chunk(m, DONE, n.ChunkType.ERROR, 5, struct.pack(">IH", 0, 0)),
    "bad magic": lambda m: struct.pack(">IIQ", 0x96744668, 0, 5),
    "huge chunk": lambda m: (
        h.EXTENDED_REPLY.pack(h.EXTENDED_REPLY.magic, DONE, 1, 5, 4096, 1 << 40)
        if m == "extended"
        else h.STRUCTURED_REPLY.pack(h.STRUCTURED_REPLY.magic, DONE, 1, 5, 0xFFFFFFFF)
    ),
    "simple reply to a structured read": lambda m: struct.pack(">IIQ", n.wire.SIMPLE_REPLY_MAGIC, 0, 5) + bytes(1024),
}


@pytest.mark.parametrize("mode", ["structured", "extended"])
@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_server_violations_are_remote_errors(mode: str, name: str) -> None:
    client, _ = connected_client(mode)
    client.receive_data(VIOLATIONS[name](mode))
    with pytest.raises(n.RemoteProtocolError):
        while client.next_event() is not n.NEED_DATA:
            pass
    assert client.phase is n.Phase.ERROR


def test_extended_reply_must_echo_the_offset() -> None:
    client, _ = connected_client("extended")
    good = data_chunk("extended", DONE, 5, 4096, bytes(1024))
    client.receive_data(good[:16] + struct.pack(">Q", 0) + good[24:])  # the header's offset field, zeroed
    with pytest.raises(n.RemoteProtocolError, match="echo"):
        client.next_event()


def test_chunks_split_at_any_byte_give_the_same_reply() -> None:
    stream = data_chunk("structured", 0, 5, 4096 + 512, b"b" * 512) + data_chunk(
        "structured", DONE, 5, 4096, b"a" * 512
    )
    for cut in range(1, len(stream)):
        client, _ = connected_client("structured")
        client.receive_data(stream[:cut])
        got = [e for e in iter(client.next_event, n.NEED_DATA)]
        client.receive_data(stream[cut:])
        got += [e for e in iter(client.next_event, n.NEED_DATA)]
        (reply,) = got
        assert isinstance(reply, n.ReadReply) and bytes(reply.data) == b"a" * 512 + b"b" * 512


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["greeting", "options", "simple", "structured", "extended"]))
def test_random_server_bytes_give_events_or_remote_protocol_error(garbage: bytes, phase: str) -> None:
    if phase == "greeting":
        client = n.ClientConnection()
    elif phase == "options":
        client = n.ClientConnection()
        client.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 3}))
        client.next_event()
        client.send(n.OptionGo("disk", (n.InfoType.BLOCK_SIZE,)))
    else:
        client, _ = connected_client(phase)
    try:
        client.receive_data(garbage)
        for _ in range(1000):
            if client.next_event() in (n.NEED_DATA, n.PAUSED):
                break
        client.receive_data(b"")
        for _ in range(1000):
            if isinstance(client.next_event(), n.ConnectionClosed):
                break
    except n.RemoteProtocolError:
        assert client.phase is n.Phase.ERROR


def test_no_request_after_disconnect() -> None:
    p = Pair()
    p.connect("simple")
    p.client.send(n.DisconnectRequest())
    with pytest.raises(n.LocalProtocolError, match="DISC"):
        p.client.send(n.ReadRequest(1, 0, 512))


def test_a_reply_without_done_is_a_remote_error() -> None:
    client, _ = connected_client("structured")
    client.receive_data(data_chunk("structured", 0, 5, 4096, bytes(512)))
    assert client.next_event() is n.NEED_DATA
    client.receive_data(b"")
    with pytest.raises(n.RemoteProtocolError, match="DONE"):
        client.next_event()


@pytest.mark.parametrize("mode", ["simple", "structured"])
def test_eshutdown_makes_the_client_disconnect(mode: str) -> None:
    p = Pair()
    p.connect(mode)
    p.client.send(n.ReadRequest(1, 0, 512))
    p.client.send(n.ReadRequest(2, 512, 512))
    p.server.receive_data(b"".join(bytes(x) for x in p.client.data_to_send()))
    first, second = [e for e in iter(p.server.next_event, n.NEED_DATA)]
    p.server.send(n.ErrorReply(first.cookie, n.Errno.ESHUTDOWN, "going down"))
    p.client.receive_data(b"".join(bytes(x) for x in p.server.data_to_send()))
    (reply,) = p.events()
    assert reply.error == n.Errno.ESHUTDOWN and p.client.server_shutting_down
    assert not p.client.must_disconnect  # read 2 is still in flight
    with pytest.raises(n.LocalProtocolError, match="ESHUTDOWN"):
        p.client.send(n.FlushRequest(3))
    p.server.send(n.ReadData(second.cookie, second.offset, bytes(512)))
    p.client.receive_data(b"".join(bytes(x) for x in p.server.data_to_send()))
    p.events()
    assert p.client.must_disconnect
    p.client.send(n.DisconnectRequest())
    assert not p.client.must_disconnect
