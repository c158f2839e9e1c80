"""The client engine's short roads (a plain READ or WRITE sent, and whole replies to reads taken many at a time)
against its full checks: the same requests and the same reply bytes, whole, cut into pieces or broken field by
field, must give the same events, the same bytes sent and the same errors with the fast paths on and off."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

import nbdproto as n
from tests.test_pair import ALL_FLAGS, Pair
from tests.test_pair import MIB as SIZE

TF, F = n.TransmissionFlags, n.CommandFlags

MODES = ("simple", "structured", "extended")
SIMPLE, STRUCTURED, EXTENDED = 0x67446698, 0x668E33EF, 0x6E8A278C  # the spec's reply magics
OFFSET_DATA, OFFSET_HOLE, DONE = 1, 2, 1


class _FullChecksOnly(n.ClientConnection):
    _fast_paths = False


def _connected(kind: type[n.ClientConnection], mode: str) -> n.ClientConnection:
    """A client of ``kind`` in transmission with a server engine, in the reply form ``mode`` names."""
    pair = Pair()
    pair.client = kind()
    pair.connect(mode)
    return pair.client


def _whole(mode: str, cookie: int, offset: int, data: bytes) -> list[int | bytes]:
    """The fields of a whole reply to a read, in wire order, the data last (each may be broken)."""
    if mode == "simple":
        return [SIMPLE, 0, cookie, data]
    if mode == "structured":
        return [STRUCTURED, DONE, OFFSET_DATA, cookie, len(data) + 8, offset, data]
    return [EXTENDED, DONE, OFFSET_DATA, cookie, offset, len(data) + 8, offset, data]


_FORMATS = {"simple": ">IIQ", "structured": ">IHHQIQ", "extended": ">IHHQQQQ"}
_WIDTHS = {"simple": (32, 32, 64), "structured": (32, 16, 16, 64, 32, 64), "extended": (32, 16, 16, 64, 64, 64, 64)}


def _encode(mode: str, fields: list[int | bytes]) -> bytes:
    *numbers, data = fields
    return struct.pack(_FORMATS[mode], *numbers) + bytes(data)  # type: ignore[arg-type]


Conversation = tuple[str, list[tuple[int, int, int]], bytes, list[int]]


@st.composite
def _conversations(draw: st.DrawFn) -> Conversation:
    """A reply form, reads (cookie, offset, length), the replies' bytes (each whole, or with one field broken
    or its data cut short) and where the stream is cut into receives."""
    mode = draw(st.sampled_from(MODES))
    reads = [
        (cookie, draw(st.sampled_from([0, 512, 4096, SIZE - 4096])), draw(st.sampled_from([512, 4096])))
        for cookie in range(draw(st.integers(1, 6)))
    ]
    replies = []
    for cookie, offset, length in reads:
        fields = _whole(mode, cookie, offset, bytes([cookie + 1]) * length)
        if draw(st.booleans()):
            at = draw(st.integers(0, len(fields) - 1))
            value = fields[at]
            if isinstance(value, bytes):
                fields[at] = value[: draw(st.integers(0, len(value)))]
            else:
                wrong = draw(st.sampled_from([0, 1, 2, 8, value + 1, value + 512, abs(value - 1)]))
                fields[at] = wrong % (1 << _WIDTHS[mode][at])
        replies.append(_encode(mode, fields))
    stream = b"".join(replies)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    return mode, reads, stream, [*cuts, len(stream)]


def _run(kind: type[n.ClientConnection], conversation: Conversation) -> tuple[bytes, list[Any]]:
    mode, reads, stream, cuts = conversation
    client = _connected(kind, mode)
    for cookie, offset, length in reads:
        client.send(n.ReadRequest(cookie, offset, length))
    sent = b"".join(bytes(p) for p in client.data_to_send())
    seen: list[Any] = []
    start = 0
    for cut in cuts:
        if cut == start:
            continue  # no bytes: receive_data(b"") would say the server closed
        client.receive_data(stream[start:cut])
        start = cut
        while True:
            try:
                event = client.next_event()
            except n.RemoteProtocolError as exc:
                seen.append(("error", str(exc)))
                return sent, seen
            if event is n.NEED_DATA or event is n.PAUSED:
                break
            seen.append((type(event).__name__, getattr(event, "cookie", None), bytes(getattr(event, "data", b""))))
    seen.append(("in flight", client.in_flight))
    return sent, seen


@settings(max_examples=300, deadline=None)
@given(_conversations())
def test_whole_read_replies_give_what_the_full_checks_give(conversation: Conversation) -> None:
    assert _run(n.ClientConnection, conversation) == _run(_FullChecksOnly, conversation)


def test_a_batch_of_whole_replies_takes_the_fast_road_in_every_form() -> None:
    """The short road is taken (each reply is an event of its own, none left in flight) and the data is each
    read's own, in every reply form."""
    for mode in MODES:
        client = _connected(n.ClientConnection, mode)
        for cookie in range(8):
            client.send(n.ReadRequest(cookie, cookie * 4096, 4096))
        client.data_to_send()
        client.receive_data(b"".join(_encode(mode, _whole(mode, c, c * 4096, bytes([c]) * 4096)) for c in range(8)))
        events = [client.next_event() for _ in range(8)]
        assert [(type(e), e.cookie, bytes(e.data)) for e in events] == [  # type: ignore[attr-defined]
            (n.ReadReply, c, bytes([c]) * 4096) for c in range(8)
        ]
        assert client.next_event() is n.NEED_DATA and client.in_flight == 0


def test_a_read_sent_without_a_buffer_gets_one_when_its_data_arrives() -> None:
    """A read sent without a buffer is given its own only when its data arrives (Pending.own_buffer): made
    from the received bytes on the short road (one copy, nothing zeroed first), made and filled on the full
    one (a reply cut short, a hole). Either way the reply's data is a writable buffer of its own."""
    for mode in MODES:
        client = _connected(n.ClientConnection, mode)
        client.send(n.ReadRequest(1, 0, 4096))
        assert client._pending[1].buffer is None  # type: ignore[attr-defined]
        client.data_to_send()
        reply, other = (_encode(mode, _whole(mode, cookie, 0, b"\x07" * 4096)) for cookie in (1, 2))
        for cut in (len(other), len(other) - 100):  # the short road, then a reply that arrives in two parts
            client.send(n.ReadRequest(2, 0, 4096))
            client.data_to_send()
            client.receive_data(other[:cut])
            event = client.next_event()
            if cut < len(other):
                assert event is n.NEED_DATA
                client.receive_data(other[cut:])
                event = client.next_event()
            assert type(event) is n.ReadReply and bytes(event.data) == b"\x07" * 4096 and not event.data.readonly
        client.receive_data(reply)
        event = client.next_event()
        assert type(event) is n.ReadReply and event.cookie == 1 and bytes(event.data) == b"\x07" * 4096


Sends = tuple[str, int, int, bool, list[tuple[str, int, int, int, int]]]


@st.composite
def _sends(draw: st.DrawFn) -> Sends:
    """A reply form, the export's flags and minimum block size, whether the client is strict, and requests
    (kind, cookie, flags, offset, length): in range or not, aligned or not, within the maximum payload or not,
    with a repeated cookie now and then."""
    mode = draw(st.sampled_from(MODES))
    flags = draw(st.sampled_from([ALL_FLAGS, ALL_FLAGS | TF.READ_ONLY, TF.HAS_FLAGS, TF.HAS_FLAGS | TF.SEND_FUA]))
    minimum = draw(st.sampled_from([1, 512, 4096]))
    requests = [
        (
            draw(st.sampled_from(["read", "write", "read into", "read into short", "read into read-only"])),
            draw(st.integers(0, 3)),
            draw(st.sampled_from([0, 0, 0, F.FUA, F.DF, F.NO_HOLE, F.PAYLOAD_LEN])),
            draw(st.sampled_from([0, 1, 512, 4096, SIZE - 4096, SIZE - 1, SIZE, -4096])),
            draw(st.sampled_from([0, 1, 512, 4096, _MAX_PAYLOAD, _MAX_PAYLOAD + 4096])),
        )
        for _ in range(draw(st.integers(1, 5)))
    ]
    return mode, int(flags), minimum, draw(st.booleans()), requests


_MAX_PAYLOAD = 65536


def _send_all(kind: type[n.ClientConnection], sends: Sends) -> tuple[list[Any], bytes, int]:
    mode, flags, minimum, strict, requests = sends
    pair = Pair()
    pair.disk.export = n.Export(
        "disk",
        SIZE,
        TF(flags),
        minimum_block_size=minimum,
        preferred_block_size=4096,
        maximum_payload=_MAX_PAYLOAD,
        meta_contexts=(n.BASE_ALLOCATION,),
    )
    pair.client = kind()
    pair.client.strict = strict
    pair.connect(mode)
    client, outcomes = pair.client, []
    for what, cookie, request_flags, offset, length in requests:
        event: n.Event
        if what == "read":
            event = n.ReadRequest(cookie, offset, length, F(request_flags))
        elif what.startswith("read into"):  # the caller's buffer: the right size, too short, or read-only
            buffer = memoryview(bytearray(length - 1 if what.endswith("short") and length else length))
            event = n.ReadRequest(cookie, offset, length, F(request_flags), buffer=buffer)
            if what.endswith("read-only"):
                event = n.ReadRequest(cookie, offset, length, F(request_flags), buffer=buffer.toreadonly())
        else:
            event = n.WriteRequest(cookie, offset, bytes(length), F(request_flags))
        try:
            client.send(event)
        except n.LocalProtocolError as exc:
            outcomes.append((str(exc), getattr(exc, "error_code", None)))
        else:
            outcomes.append("sent")
    return outcomes, b"".join(bytes(piece) for piece in client.data_to_send()), client.in_flight


@settings(max_examples=500, deadline=None)
@given(_sends())
@example(("simple", int(ALL_FLAGS), 512, True, [("write", 1, 0, 0, _MAX_PAYLOAD + 4096)]))  # strict: refused
@example(("extended", int(ALL_FLAGS), 512, False, [("write", 1, 0, 0, _MAX_PAYLOAD + 4096)]))  # lax: sent
@example(("structured", int(ALL_FLAGS | TF.READ_ONLY), 1, False, [("write", 1, 0, 0, 512)]))
@example(("simple", int(ALL_FLAGS), 4096, False, [("write", 1, 0, 512, 512), ("write", 1, 0, 0, 4096)]))
def test_plain_reads_and_writes_are_sent_as_the_full_checks_send_them(sends: Sends) -> None:
    assert _send_all(n.ClientConnection, sends) == _send_all(_FullChecksOnly, sends)


def test_a_plain_write_takes_the_fast_road_in_every_form() -> None:
    """The header and the data go out as the spec lays them out (PAYLOAD_LEN set with extended headers)."""
    for mode in MODES:
        client = _connected(n.ClientConnection, mode)
        client.send(n.WriteRequest(5, 4096, b"x" * 512))
        sent = b"".join(bytes(piece) for piece in client.data_to_send())
        if mode == "extended":
            assert sent == struct.pack(">IHHQQQ", 0x21E41C71, F.PAYLOAD_LEN, 1, 5, 4096, 512) + b"x" * 512
        else:
            assert sent == struct.pack(">IHHQQI", 0x25609513, 0, 1, 5, 4096, 512) + b"x" * 512
        assert client.in_flight == 1
