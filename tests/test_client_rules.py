"""ClientConnection and the negotiation plan against the spec's client-side rules that test_pair does not
already cover: what the client ignores, what it refuses to send, how it ends a handshake it cannot complete,
and how it reads the server's answers (spec: "Client flags", "Option types", "Termination of the session
during option haggling", "Structured reply flags", "Structured reply types")."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

import nbdproto as n
from nbdproto.client._negotiation import ClientNegotiation, NegotiationError
from nbdproto.wire import headers as h
from nbdproto.wire import layout as w
from tests.test_pair import Pair

OPT, R, TF, F = n.Option, n.OptionReplyType, n.TransmissionFlags, n.CommandFlags
MIB = 1 << 20
DONE = n.ReplyFlags.DONE


def greeted(flags: int = 3) -> n.ClientConnection:
    client = n.ClientConnection()
    client.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": flags}))
    assert isinstance(client.next_event(), n.ServerGreeting)
    client.data_to_send()
    return client


def sent(client: n.ClientConnection) -> bytes:
    return b"".join(bytes(p) for p in client.data_to_send())


def option_reply(code: int, reply_type: int, payload: bytes = b"") -> bytes:
    return h.OPTION_REPLY.pack(h.OPTION_REPLY.magic, code, reply_type, len(payload)) + payload


def info(kind: int, payload: bytes) -> bytes:
    return option_reply(OPT.GO, R.INFO, struct.pack(">H", kind) + payload)


def export_info(size: int = MIB, flags: int = TF.HAS_FLAGS) -> bytes:
    return info(n.InfoType.EXPORT, struct.pack(">QH", size, flags))


def structured_client(contexts: dict[int, str]) -> n.ClientConnection:
    """A client in transmission with structured replies and the given contexts, fed by hand."""
    client = greeted()
    client.send(n.OptionStructuredReply())
    client.receive_data(option_reply(OPT.STRUCTURED_REPLY, R.ACK))
    client.next_event()
    client.send(n.OptionSetMetaContext("disk", tuple(contexts.values())))
    data = b"".join(
        option_reply(OPT.SET_META_CONTEXT, R.META_CONTEXT, struct.pack(">I", i) + name.encode())
        for i, name in contexts.items()
    )
    client.receive_data(data + option_reply(OPT.SET_META_CONTEXT, R.ACK))
    client.next_event()
    client.send(n.OptionGo("disk"))
    client.receive_data(export_info() + option_reply(OPT.GO, R.ACK))
    assert isinstance(client.next_event(), n.HandshakeComplete)
    sent(client)
    return client


def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    return h.STRUCTURED_REPLY.pack(h.STRUCTURED_REPLY.magic, flags, kind, cookie, len(payload)) + payload


# --- Handshake ---------------------------------------------------------------------------------------------------


def test_unknown_handshake_flags_are_ignored() -> None:
    client = n.ClientConnection()
    client.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 0xFFFF}))
    assert client.next_event() == n.ServerGreeting(0xFFFF)
    assert sent(client) == struct.pack(">I", n.ClientFlags.FIXED_NEWSTYLE | n.ClientFlags.NO_ZEROES)


def test_a_client_may_decline_fixed_newstyle() -> None:
    # ClientConnection(fixed_newstyle=False) answers as a client that lacks it (libnbd's set_handshake_flags):
    # its flags leave FIXED_NEWSTYLE out, and only NBD_OPT_EXPORT_NAME may follow.
    client = n.ClientConnection(fixed_newstyle=False, no_zeroes=False)
    client.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 3}))
    assert isinstance(client.next_event(), n.ServerGreeting)
    assert sent(client) == struct.pack(">I", 0)
    with pytest.raises(n.LocalProtocolError, match="only NBD_OPT_EXPORT_NAME"):
        client.send(n.OptionGo("", ()))


def test_no_option_after_go_succeeded() -> None:
    p = Pair()
    p.connect("structured")
    with pytest.raises(n.LocalProtocolError):
        p.client.send(n.OptionList())


def test_dataless_options_carry_no_data() -> None:
    for event, code in (
        (n.OptionList(), OPT.LIST),
        (n.OptionStartTLS(), OPT.STARTTLS),
        (n.OptionAbort(), OPT.ABORT),
        (n.OptionStructuredReply(), OPT.STRUCTURED_REPLY),
        (n.OptionExtendedHeaders(), OPT.EXTENDED_HEADERS),
    ):
        client = greeted()
        client.send(event)
        assert sent(client) == h.OPTION_REQUEST.pack(h.OPTION_REQUEST.magic, code, 0)


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (n.OptionGo("disk", (n.InfoType.NAME, n.InfoType.NAME)), "twice"),
        (n.OptionInfo("disk", (n.InfoType.BLOCK_SIZE, 7, 7)), "twice"),
        (n.OptionListMetaContext("disk", ("allocation",)), "namespace"),
        (n.OptionListMetaContext("disk", (":allocation",)), "namespace"),
    ],
)
def test_repeated_information_requests_and_queries_without_namespace_are_refused(event: object, match: str) -> None:
    client = greeted()
    with pytest.raises(n.LocalProtocolError, match=match):
        client.send(event)  # type: ignore[arg-type]
    assert sent(client) == b""


def test_nothing_is_sent_after_abort() -> None:
    client = greeted()
    client.send(n.OptionAbort())
    sent(client)
    client.receive_data(option_reply(OPT.ABORT, R.ACK))
    assert isinstance(client.next_event(), n.ClientAborted)
    with pytest.raises(n.LocalProtocolError):
        client.send(n.OptionList())
    assert sent(client) == b""


def test_information_replies_in_any_order_and_of_unknown_types() -> None:
    client = greeted()
    client.send(n.OptionGo("disk", (n.InfoType.BLOCK_SIZE, n.InfoType.NAME)))
    client.receive_data(
        info(n.InfoType.BLOCK_SIZE, struct.pack(">III", 512, 4096, MIB))
        + info(99, b"what is this")
        + info(n.InfoType.NAME, b"canonical")
        + export_info(2 * MIB, TF.HAS_FLAGS | TF.SEND_FLUSH)
        + option_reply(OPT.GO, R.ACK)
    )
    done = client.next_event()
    assert isinstance(done, n.HandshakeComplete)
    export = done.export
    assert (export.name, export.size, export.minimum_block_size, export.maximum_payload) == (
        "canonical",
        2 * MIB,
        512,
        MIB,
    )


def test_unknown_transmission_flags_are_ignored() -> None:
    client = greeted()
    client.send(n.OptionGo("disk"))
    sent(client)
    client.receive_data(export_info(MIB, TF.HAS_FLAGS | TF.SEND_FLUSH | 0x8000) + option_reply(OPT.GO, R.ACK))
    done = client.next_event()
    assert isinstance(done, n.HandshakeComplete) and done.export.flags & TF.SEND_FLUSH
    client.send(n.FlushRequest(1))
    assert h.REQUEST.unpack_from(sent(client))[2] == n.Command.FLUSH


def test_listed_contexts_keep_every_name_whatever_their_ids() -> None:
    # spec: the id of a listed context is reserved (zero, from our server) and the client MUST disregard it.
    p = Pair()
    p.start()
    p.ask(n.OptionStructuredReply())
    (listed,) = p.ask(n.OptionListMetaContext("disk", ()))
    assert isinstance(listed, n.MetaContexts)
    assert sorted(listed.contexts.values()) == [n.BASE_ALLOCATION, "x:odd"]


def test_contexts_before_an_error_are_disregarded() -> None:
    client = greeted()
    client.send(n.OptionStructuredReply())
    client.receive_data(option_reply(OPT.STRUCTURED_REPLY, R.ACK))
    client.next_event()
    client.send(n.OptionSetMetaContext("disk", (n.BASE_ALLOCATION,)))
    context = option_reply(OPT.SET_META_CONTEXT, R.META_CONTEXT, struct.pack(">I", 5) + b"base:allocation")
    client.receive_data(context + option_reply(OPT.SET_META_CONTEXT, R.ERR_TOO_BIG))
    error = client.next_event()
    assert isinstance(error, n.OptionError) and client.meta_contexts == {}


def test_context_ids_are_whatever_the_server_chose() -> None:
    client = structured_client({1000: n.BASE_ALLOCATION, 7: "x:odd"})
    assert client.meta_contexts == {1000: n.BASE_ALLOCATION, 7: "x:odd"}
    client.send(n.BlockStatusRequest(1, 0, 4096))
    sent(client)
    client.receive_data(
        chunk(0, n.ChunkType.BLOCK_STATUS, 1, struct.pack(">III", 7, 4096, 0))
        + chunk(DONE, n.ChunkType.BLOCK_STATUS, 1, struct.pack(">III", 1000, 4096, 3))
    )
    assert client.next_event() == n.BlockStatusReply(1, {7: (n.Extent(4096, 0),), 1000: (n.Extent(4096, 3),)})


def test_contexts_for_another_export_do_not_carry_over() -> None:
    p = Pair()
    p.disk.export = n.Export("disk", MIB, meta_contexts=(n.BASE_ALLOCATION,))
    p.start()
    p.ask(n.OptionStructuredReply())
    p.ask(n.OptionSetMetaContext("disk", (n.BASE_ALLOCATION,)))
    p.client.send(n.OptionGo("disk"))
    p.pump()
    p.events()
    assert p.client.meta_contexts
    q = Pair()
    q.start()
    q.ask(n.OptionStructuredReply())
    q.server_events.clear()
    (refused,) = q.ask(n.OptionSetMetaContext("other", (n.BASE_ALLOCATION,)))
    assert isinstance(refused, n.OptionError)
    (done,) = q.ask(n.OptionGo("disk"))
    assert isinstance(done, n.HandshakeComplete) and done.meta_contexts == {}
    with pytest.raises(n.LocalProtocolError, match="meta context"):
        q.client.send(n.BlockStatusRequest(1, 0, 512))


def test_a_new_connection_remembers_nothing() -> None:
    p = Pair()
    p.connect("extended")
    assert p.client.extended_headers and p.client.meta_contexts
    fresh = n.ClientConnection()
    assert fresh.phase is n.Phase.GREETING and not fresh.structured_replies and not fresh.extended_headers
    assert fresh.meta_contexts == {} and fresh.export is None and not fresh.tls_active


def test_default_limits_without_block_size_information() -> None:
    # Without NBD_INFO_BLOCK_SIZE the client holds requests to the spec's defaults (payload at most 32 MiB).
    client = greeted()
    client.send(n.OptionGo("disk"))
    client.receive_data(export_info(1 << 30, TF.HAS_FLAGS) + option_reply(OPT.GO, R.ACK))
    done = client.next_event()
    assert isinstance(done, n.HandshakeComplete) and not done.export.block_sizes_known
    with pytest.raises(n.LocalProtocolError, match="maximum payload"):
        client.send(n.ReadRequest(1, 0, 32 * MIB + 1))
    client.send(n.ReadRequest(2, 0, 32 * MIB))


# --- Ending a handshake that cannot succeed: NBD_OPT_ABORT, a soft disconnect ----------------------------------


def run_plan(
    plan: ClientNegotiation,
    server: n.ServerConnection,
    answer: Callable[[n.ExportRequested], object],
    codes: list[int] | None = None,
) -> list[int]:
    """Drive ``plan`` against ``server`` in memory; the option codes the client sent, in order (also kept in
    ``codes``, for a plan that ends in an exception)."""
    client = n.ClientConnection()
    codes = [] if codes is None else codes
    flags_sent = False
    for _ in range(100):
        data = b"".join(bytes(p) for p in server.data_to_send())
        if data:
            client.receive_data(data)
        event = client.next_event()
        while event not in (n.NEED_DATA, n.PAUSED):
            send = plan.step(event)  # type: ignore[arg-type]
            if isinstance(event, n.StartTLS):
                client.tls_established()
                server.tls_established()
                send = plan.tls_done()
            if send is not None:
                client.send(send)  # type: ignore[arg-type]
            if plan.done:
                return codes
            event = client.next_event()
        out = b"".join(bytes(p) for p in client.data_to_send())
        pos = 0
        if out and not flags_sent:
            flags_sent, pos = True, 4  # the client flags answer the greeting
        while pos < len(out):
            _, code, length = h.OPTION_REQUEST.unpack_from(out, pos)
            codes.append(code)
            pos += h.OPTION_REQUEST.size + length
        server.receive_data(out)
        while (ev := server.next_event()) not in (n.NEED_DATA, n.PAUSED):
            if isinstance(ev, n.ExportRequested):
                server.send(answer(ev))  # type: ignore[arg-type]
            if isinstance(ev, (n.ConnectionClosed, n.ClientAborted)):
                client.receive_data(b"".join(bytes(p) for p in server.data_to_send()))
                client.receive_data(b"")
                break
    raise AssertionError("the plan did not finish")


def disk(ev: n.ExportRequested) -> object:
    return n.Export(ev.name, MIB, meta_contexts=(n.BASE_ALLOCATION,)) if ev.name == "disk" else n.ExportUnknown("no")


@pytest.mark.parametrize(
    ("plan", "server", "match", "refused"),
    [
        (ClientNegotiation("nope"), n.ServerConnection(), "refused", OPT.GO),
        (ClientNegotiation("disk", require_tls=True), n.ServerConnection(), "refused TLS", OPT.STARTTLS),
        (ClientNegotiation("disk"), n.ServerConnection(tls=n.TlsMode.FORCEDTLS), "requires TLS", OPT.EXTENDED_HEADERS),
        (ClientNegotiation("disk", list_exports=True), n.ServerConnection(exports=None), "list", OPT.LIST),
    ],
)
def test_a_handshake_that_cannot_succeed_ends_with_abort(
    plan: ClientNegotiation, server: n.ServerConnection, match: str, refused: int
) -> None:
    # spec: a client ending the session MUST use a soft disconnect (NBD_OPT_ABORT) where it can.
    codes: list[int] = []
    with pytest.raises(NegotiationError, match=match):
        run_plan(plan, server, disk, codes)
    assert codes[-2:] == [refused, OPT.ABORT]
    assert server.phase is n.Phase.CLOSED  # the server saw NBD_OPT_ABORT, not a dropped connection


def test_err_shutdown_makes_the_client_abort() -> None:
    def shutting_down(ev: n.ExportRequested) -> object:
        return n.ExportUnknown("server going down", R.ERR_SHUTDOWN)

    server = n.ServerConnection()
    codes: list[int] = []
    with pytest.raises(NegotiationError, match="shutting down"):
        run_plan(ClientNegotiation("disk", meta_contexts=()), server, shutting_down, codes)
    assert codes[-2:] == [OPT.GO, OPT.ABORT] and server.phase is n.Phase.CLOSED


def test_the_plan_sends_each_state_changing_option_once() -> None:
    server = n.ServerConnection()
    codes = run_plan(ClientNegotiation("disk"), server, disk)
    assert codes == [OPT.EXTENDED_HEADERS, OPT.SET_META_CONTEXT, OPT.GO]


def test_a_server_without_structured_replies_is_served_simple() -> None:
    server = n.ServerConnection(structured_replies=False)
    plan = ClientNegotiation("disk")
    codes = run_plan(plan, server, disk)
    assert codes == [OPT.EXTENDED_HEADERS, OPT.STRUCTURED_REPLY, OPT.GO]
    assert isinstance(plan.result, n.HandshakeComplete) and not plan.result.structured_replies


# --- Replies --------------------------------------------------------------------------------------------------


def test_unknown_status_bits_and_reply_flags_are_passed_over() -> None:
    client = structured_client({1: n.BASE_ALLOCATION})
    client.send(n.BlockStatusRequest(1, 0, 4096))
    sent(client)
    client.receive_data(chunk(DONE | 0x8000, n.ChunkType.BLOCK_STATUS, 1, struct.pack(">III", 1, 4096, 0xFFFF)))
    assert client.next_event() == n.BlockStatusReply(1, {1: (n.Extent(4096, 0xFFFF),)})


def test_an_unknown_error_chunk_fails_only_its_request() -> None:
    client = structured_client({1: n.BASE_ALLOCATION})
    client.send(n.ReadRequest(1, 0, 512))
    client.send(n.ReadRequest(2, 0, 512))
    sent(client)
    client.receive_data(chunk(DONE, 0x8000 | 77, 1, struct.pack(">IH", n.Errno.EIO, 2) + b"hi" + b"extra"))
    reply = client.next_event()
    assert isinstance(reply, n.ErrorReply) and (reply.cookie, reply.error, reply.message) == (1, n.Errno.EIO, "hi")
    client.receive_data(chunk(DONE, n.ChunkType.OFFSET_DATA, 2, struct.pack(">Q", 0) + bytes(512)))
    assert isinstance(client.next_event(), n.ReadReply)


def test_an_unknown_chunk_type_that_is_not_an_error_ends_the_connection() -> None:
    client = structured_client({1: n.BASE_ALLOCATION})
    client.send(n.ReadRequest(1, 0, 512))
    sent(client)
    client.receive_data(chunk(DONE, 77, 1, b""))
    with pytest.raises(n.RemoteProtocolError, match="unknown chunk type"):
        client.next_event()


@pytest.mark.parametrize("extended", [False, True])
def test_request_framing(extended: bool) -> None:
    p = Pair()
    p.connect("extended" if extended else "simple")
    codec = h.EXTENDED_REQUEST if extended else h.REQUEST
    p.client.send(n.WriteRequest(1, 512, b"abc"))
    header, data = (bytes(x) for x in p.client.data_to_send())
    _, flags, command, cookie, offset, length = codec.unpack_from(header)
    assert (command, cookie, offset, length, data) == (n.Command.WRITE, 1, 512, 3, b"abc")
    assert bool(flags & F.PAYLOAD_LEN) == extended
    p.client.send(n.FlushRequest(2))
    p.client.send(n.DisconnectRequest(3))
    for piece, command in zip(p.client.data_to_send(), (n.Command.FLUSH, n.Command.DISC), strict=True):
        _, flags, got, _, offset, length = codec.unpack_from(bytes(piece))
        assert (got, flags, offset, length) == (command, 0, 0, 0)
