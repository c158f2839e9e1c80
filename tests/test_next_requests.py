"""ServerConnection.next_requests: the requests of the received bytes in one call, exactly as a loop over
next_event takes them (the same requests in the same order, the same event ending each batch, the same error
replies), however the bytes are cut into chunks and whatever mix of requests they hold."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as n
from nbdproto.engine import WORK_TYPES
from nbdproto.engine._server import ServerConnection
from tests.nbdbytes import client_flags, info_payload, joined, option, request
from tests.test_server import export, handshake, new_server

C, F = n.Command, n.CommandFlags
KIB, MIB = 1 << 10, 1 << 20

# One request of each kind a stream may hold, by cookie: bytes on the wire (with a WRITE's payload).
KINDS = ["read", "read DF", "write", "write FUA", "flush", "trim", "read past the end", "unaligned read", "disc"]


def encoded(kind: str, cookie: int, extended: bool) -> bytes:
    offset = 4 * KIB * (cookie % 200)
    payload_len = int(F.PAYLOAD_LEN) if extended else 0
    if kind == "read":
        return request(C.READ, cookie, offset, 4 * KIB, extended=extended)
    if kind == "read DF":
        return request(C.READ, cookie, offset, 4 * KIB, int(F.DF), extended=extended)
    if kind in ("write", "write FUA"):
        flags = (int(F.FUA) if kind == "write FUA" else 0) | payload_len
        return request(C.WRITE, cookie, offset, 4 * KIB, flags, extended=extended) + bytes([cookie % 256]) * 4 * KIB
    if kind == "flush":
        return request(C.FLUSH, cookie, extended=extended)
    if kind == "trim":
        return request(C.TRIM, cookie, offset, 4 * KIB, extended=extended)
    if kind == "read past the end":
        return request(C.READ, cookie, MIB, 4 * KIB, extended=extended)
    if kind == "unaligned read":
        return request(C.READ, cookie, 100, 4 * KIB, extended=extended)
    return request(C.DISC, cookie, extended=extended)


def connected(extended: bool) -> ServerConnection:
    s = new_server()
    handshake(s, structured=True, extended=extended, exp=export(minimum_block_size=512))
    return s


def described(event: object) -> object:
    if isinstance(event, n.WriteRequest):
        return ("WriteRequest", event.cookie, event.offset, bytes(event.data), event.flags)
    return event


def by_next_event(s: ServerConnection, chunks: list[bytes]) -> tuple[list[object], list[object], bytes]:
    work: list[object] = []
    ends: list[object] = []
    for chunk in chunks:
        s.receive_data(chunk)
        while True:
            event = s.next_event()
            if type(event) in WORK_TYPES:
                work.append(described(event))
                continue
            ends.append(event)
            if event is n.NEED_DATA or event is n.PAUSED or isinstance(event, n.ConnectionClosed):
                break
    return work, ends, joined(s)


def by_next_requests(s: ServerConnection, chunks: list[bytes]) -> tuple[list[object], list[object], bytes]:
    work: list[object] = []
    ends: list[object] = []
    for chunk in chunks:
        s.receive_data(chunk)
        while True:
            batch: list[n.Event] = []
            event = s.next_requests(batch)
            work += [described(e) for e in batch]
            assert all(type(e) in WORK_TYPES for e in batch)
            ends.append(event)
            if event is n.NEED_DATA or event is n.PAUSED or isinstance(event, n.ConnectionClosed):
                break
    return work, ends, joined(s)


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=6),
    extended=st.booleans(),
)
def test_next_requests_takes_what_next_event_takes(kinds: list[str], cuts: list[int], extended: bool) -> None:
    stream = b"".join(encoded(kind, cookie, extended) for cookie, kind in enumerate(kinds, start=1))
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    one_by_one = by_next_event(connected(extended), chunks)
    batched = by_next_requests(connected(extended), chunks)
    assert batched[0] == one_by_one[0]
    assert batched[2] == one_by_one[2]
    # The same events end the batches, once the empty batches' NEED_DATA / PAUSED between them are left aside.
    assert [e for e in batched[1] if e is not n.NEED_DATA] == [e for e in one_by_one[1] if e is not n.NEED_DATA]


def test_a_chunk_of_reads_comes_whole_and_the_batch_ends_at_need_data() -> None:
    s = connected(extended=False)
    s.receive_data(b"".join(encoded("read", cookie, False) for cookie in range(1, 65)))
    batch: list[n.Event] = []
    assert s.next_requests(batch) is n.NEED_DATA
    assert [(type(e), e.cookie) for e in batch] == [(n.ReadRequest, c) for c in range(1, 65)]  # type: ignore[attr-defined]


def test_disc_ends_the_batch_and_what_was_taken_before_stays() -> None:
    s = connected(extended=False)
    s.receive_data(encoded("read", 1, False) + encoded("flush", 2, False) + encoded("disc", 3, False))
    batch: list[n.Event] = []
    assert isinstance(s.next_requests(batch), n.DisconnectRequest)
    assert [e.cookie for e in batch] == [1, 2]  # type: ignore[attr-defined]
    # The requests before DISC are still owed their replies: the engine waits for them.
    assert s.next_requests(batch) is n.PAUSED


def test_garbage_behind_good_requests_raises_and_the_good_ones_stay_in_the_batch() -> None:
    s = connected(extended=False)
    s.receive_data(encoded("read", 1, False) + encoded("write", 2, False) + b"\0" * 28)
    batch: list[n.Event] = []
    try:
        s.next_requests(batch)
    except n.RemoteProtocolError as exc:
        assert "request magic 0x0" in str(exc)
    else:
        raise AssertionError("garbage was taken as a request")
    assert [e.cookie for e in batch] == [1, 2]  # type: ignore[attr-defined]


def test_in_the_handshake_it_returns_the_handshake_events() -> None:
    s = new_server()

    s.receive_data(client_flags() + option(n.Option.GO, info_payload("disk")))
    batch: list[n.Event] = []
    assert s.next_requests(batch) == n.ExportRequested("disk", n.Option.GO)
    s.send(export())
    assert isinstance(s.next_requests(batch), n.HandshakeComplete)
    assert batch == []
