"""The spec's rule for strings ("Conventions"): every string on the wire is UTF-8 without NUL, at most 4096
bytes, error messages included. The server builds every string it sends in nbdproto.engine._replies and passes it
through ``wire_string``; these tests hold each path to the rule, with the largest legal names (4096 ASCII
bytes, and 2048 x "é", two bytes each), messages that quote them, and device errors of any length."""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
from nbdproto.devices import MemoryDevice
from nbdproto.engine._replies import wire_string
from nbdproto.serving._carry_out import carry_out
from nbdproto.serving._export import answer_export_request
from nbdproto.wire import layout as w
from tests.nbdbytes import client_flags, info_payload, joined, meta_payload, option, option_replies, replies, request
from tests.serving import BACKENDS, Export, serve_exports
from tests.test_server import events, export, handshake, new_server

OPT, R = n.Option, n.OptionReplyType
LIMIT = n.MAX_STRING_LENGTH
LONG_NAMES = {"ascii": "a" * LIMIT, "two-byte": "é" * (LIMIT // 2)}


def check_string(data: bytes, limit: int = LIMIT) -> str:
    """``data`` is a string as the spec allows one: valid UTF-8 (decode raises otherwise), no NUL, in limit."""
    assert len(data) <= limit, f"{len(data)} bytes"
    text = data.decode("utf-8")
    assert "\0" not in text
    return text


def lookup_nothing(name: str) -> None:
    return None


# --- The one bounding function --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=3000), st.integers(min_value=1, max_value=LIMIT))
def test_wire_string_always_fits_and_keeps_what_fits(text: str, limit: int) -> None:
    encoded = wire_string(text, limit=limit).encode()
    check_string(encoded, limit)
    clean = text.replace("\0", "\ufffd").encode("utf-8", "replace")
    # Nothing is lost but what is over the limit (less than one character more, at the cut).
    assert clean.startswith(encoded)
    assert len(encoded) >= min(len(clean), limit - 3)


@pytest.mark.parametrize("kind", sorted(LONG_NAMES))
def test_wire_string_cuts_on_a_character_boundary(kind: str) -> None:
    message = f"no export named {LONG_NAMES[kind]!r}"
    out = wire_string(message).encode()
    check_string(out)
    assert message.encode().startswith(out) and len(out) >= LIMIT - 1


def test_names_that_do_not_fit_are_an_application_error() -> None:
    assert wire_string("é" * 2048, "export name") == "é" * 2048
    for bad in ("é" * 2049, "a\0b", "\ud800"):
        with pytest.raises(n.LocalProtocolError):
            wire_string(bad, "export name")


def test_nul_and_lone_surrogates_in_messages_are_replaced() -> None:
    assert wire_string("a\0b") == "a\ufffdb"
    assert wire_string("x\ud800y") == "x?y"


# --- Option replies ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LONG_NAMES))
@pytest.mark.parametrize("code", [OPT.INFO, OPT.GO])
def test_info_and_go_for_an_unknown_4096_byte_name(kind: str, code: n.Option) -> None:
    # The case: a legal 4096-byte name, refused with a message that quotes it.
    name = LONG_NAMES[kind]
    assert len(name.encode()) == LIMIT
    s = new_server()
    s.receive_data(client_flags() + option(code, info_payload(name)))
    (asked,) = events(s)
    answer = answer_export_request(asked, lookup_nothing, None, None)
    assert isinstance(answer, n.ExportUnknown) and len(answer.message.encode()) > LIMIT
    s.send(answer)
    (reply,) = option_replies(joined(s))
    assert reply.reply_type == R.ERR_UNKNOWN
    text = check_string(reply.data)
    assert text.startswith("no export named '") and name.startswith(text[len("no export named '") :])
    assert s.phase is n.Phase.OPTIONS


@pytest.mark.parametrize("kind", sorted(LONG_NAMES))
def test_info_for_a_known_4096_byte_name_echoes_it(kind: str) -> None:
    name = LONG_NAMES[kind]
    s = new_server()
    s.receive_data(client_flags() + option(OPT.INFO, info_payload(name, n.InfoType.NAME, n.InfoType.DESCRIPTION)))
    events(s)
    s.send(export(name, description="d" * 10_000))
    got = option_replies(joined(s))
    assert [x.reply_type for x in got] == [R.INFO] * 3 + [R.ACK]
    assert check_string(got[1].data[2:]) == name
    assert check_string(got[2].data[2:]) == "d" * LIMIT


def test_list_cuts_descriptions_and_refuses_names_that_cannot_fit() -> None:
    s = new_server(exports=[n.ExportListing("é" * 2048, "ü" * 3000)])
    s.receive_data(client_flags() + option(OPT.LIST))
    events(s)
    server, ack = option_replies(joined(s))
    fields = w.decode(w.ServerPayload, server.data)
    assert fields.name == "é" * 2048 and check_string(fields.description.encode()) == "ü" * 2048
    assert ack.reply_type == R.ACK
    s = new_server(exports=[n.ExportListing("x" * (LIMIT + 1))])
    s.receive_data(client_flags() + option(OPT.LIST))
    with pytest.raises(n.LocalProtocolError, match="export name"):
        s.next_event()
    assert s.phase is n.Phase.ERROR and joined(s) == b""


def test_every_option_error_message_is_bounded() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.GO, info_payload("x")))
    events(s)
    s.send(n.ExportUnknown("why " * 5000))
    (reply,) = option_replies(joined(s))
    assert reply.reply_type == R.ERR_UNKNOWN and len(check_string(reply.data)) == LIMIT


def test_meta_context_names_must_be_strings_with_a_namespace() -> None:
    for bad, match in ((f"x:{'y' * LIMIT}", "meta context"), ("no-namespace", "namespace")):
        s = new_server()
        s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY) + option(OPT.LIST_META_CONTEXT, meta_payload("d")))
        events(s)
        with pytest.raises(n.LocalProtocolError, match=match):
            s.send(export("d", meta_contexts=(bad,)))


@pytest.mark.parametrize("code", [OPT.INFO, OPT.GO, OPT.LIST_META_CONTEXT])
def test_names_holding_nul_are_refused_as_invalid(code: n.Option) -> None:
    s = new_server()
    payload = meta_payload("a\0b") if code == OPT.LIST_META_CONTEXT else info_payload("a\0b")
    s.receive_data(client_flags() + option(OPT.STRUCTURED_REPLY) + option(code, payload))
    assert events(s) == []
    assert [x.reply_type for x in option_replies(joined(s))] == [R.ACK, R.ERR_INVALID]


def test_export_name_holding_nul_ends_the_session() -> None:
    s = new_server()
    s.receive_data(client_flags() + option(OPT.EXPORT_NAME, b"a\0b"))
    with pytest.raises(n.RemoteProtocolError, match="NUL"):
        s.next_event()


# --- Error chunks -----------------------------------------------------------------------------------------------


class Failing(MemoryDevice):
    """A device whose reads fail with an OSError of a very long, non-ASCII message."""

    def __init__(self, message: str) -> None:
        super().__init__(1 << 20)
        self.message = message

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        raise OSError(errno.EIO, self.message)


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_a_long_error_message_is_cut_to_the_limit(mode: str) -> None:
    s = new_server()
    handshake(s, extended=mode == "extended")
    s.receive_data(request(n.Command.READ, 1, 0, 512, extended=mode == "extended"))
    (read,) = events(s)
    # A device's own message never reaches the client (nbdproto.serving.error_reply_for): its errno's text does.
    assert carry_out(Failing("ü" * 10_000), read, {}) == n.ErrorReply(1, n.Errno.EIO, os.strerror(errno.EIO))
    reply = n.ErrorReply(1, n.Errno.EIO, "ü" * 10_000)
    s.send(reply)
    (chunk,) = replies(joined(s))
    assert chunk.chunk_type == n.ChunkType.ERROR and chunk.error == n.Errno.EIO
    assert check_string(chunk.fields.message.encode()) == "ü" * (LIMIT // 2)


def test_error_messages_fit_a_maximum_payload_below_4096() -> None:
    s = new_server()
    handshake(s, exp=export(preferred_block_size=512, maximum_payload=1024))
    s.receive_data(request(n.Command.READ, 1, 0, 512))
    events(s)
    s.send(n.ErrorReply(1, n.Errno.EIO, "x" * 5000, offset=0))
    (chunk,) = replies(joined(s))
    assert chunk.chunk_type == n.ChunkType.ERROR_OFFSET and len(chunk.payload) - 14 == 1024


# --- Through real servers -----------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def option_reply(sock: socket.socket) -> tuple[int, bytes]:
    _, _, reply_type, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    return reply_type, recv_exactly(sock, length)


@pytest.mark.timeout(60)
def test_servers_answer_long_names_within_the_limit_and_keep_device_errors_to_themselves(backend: str) -> None:
    exports = {"disk": Export(Failing("é" * 9000))}
    with serve_exports(backend, exports) as base:
        port = int(base.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            recv_exactly(sock, 18)
            sock.sendall(client_flags() + option(OPT.STRUCTURED_REPLY))
            assert option_reply(sock)[0] == R.ACK
            for name in LONG_NAMES.values():
                for code in (OPT.INFO, OPT.GO):
                    sock.sendall(option(code, info_payload(name)))
                    reply_type, message = option_reply(sock)
                    assert reply_type == R.ERR_UNKNOWN
                    assert check_string(message).startswith("no export named")
            sock.sendall(option(OPT.GO, info_payload("disk")))
            while (got := option_reply(sock))[0] != R.ACK:
                assert got[0] == R.INFO
            sock.sendall(request(n.Command.READ, 9, 0, 512))
            header = recv_exactly(sock, 20)
            _, flags, kind, cookie, length = struct.unpack(">IHHQI", header)
            assert (kind, cookie, flags) == (n.ChunkType.ERROR, 9, n.ReplyFlags.DONE)
            payload = recv_exactly(sock, length)
            fields: Any = w.decode(w.ErrorChunkPayload, payload)
            assert fields.error == n.Errno.EIO and check_string(fields.message.encode()) == os.strerror(errno.EIO)


def test_a_client_refuses_to_send_strings_that_break_the_rule() -> None:
    for bad in ("x" * (LIMIT + 1), "a\0b"):
        client = n.ClientConnection()
        client.receive_data(w.encode(w.NewstyleGreeting, {"handshake_flags": 3}))
        client.next_event()
        with pytest.raises(n.LocalProtocolError):
            client.send(n.OptionGo(bad))
