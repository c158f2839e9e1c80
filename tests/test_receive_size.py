"""How much a server asks of each receive (nbdproto.serving.ReceiveSize, kept by ServerSessionLogic): RECV_SIZE while
requests are small, STREAM_RECV_SIZE while the client streams writes bigger than a receive, and back again once
it stops; a model compared with every sequence of receives hypothesis makes, and a session fed real requests."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nbdproto
import nbdproto.serving
import nbdproto_threads
from nbdproto import Command
from nbdproto.devices import MemoryDevice
from nbdproto.engine import HandshakeStep
from nbdproto.serving import RECV_SIZE, STREAM_RECV_SIZE, ReceiveSize
from tests.nbdbytes import client_flags, info_payload, option, request
from tests.test_bad_input import RawClient
from tests.waiting import wait_until

_WRITE_SIZES = st.integers(0, 40 << 20) | st.sampled_from([0, 28, 28 + (256 << 10)])
_RECEIVES = st.lists(st.tuples(st.integers(0, 4 * RECV_SIZE), st.booleans(), _WRITE_SIZES), max_size=50)


@given(_RECEIVES)
def test_the_size_follows_the_last_receive_that_said_something(receives: list[tuple[int, bool, int]]) -> None:
    size = ReceiveSize()
    streaming = False  # the model: a big receive into a payload starts it, a short receive of the stream ends it
    write_size = 0  # the size of the last write received into, when known
    for count, into_payload, arriving in receives:
        size.received(count, into_payload, arriving if into_payload else 0)
        if into_payload and arriving:
            write_size = arriving
        if into_payload and count >= RECV_SIZE:
            streaming = True
        elif not into_payload and count < RECV_SIZE:
            streaming = False
        assert size.next == (ReceiveSize.streaming(write_size) if streaming else RECV_SIZE)


@given(st.sampled_from([28, 32]), _RECEIVES)
def test_in_place_the_stream_asks_for_one_header_while_big_writes_stream_in(
    header: int, receives: list[tuple[int, bool, int]]
) -> None:
    size = ReceiveSize()
    size.in_place(header)
    streaming = False  # the model: a big write's payload starts it; a small one's, or two stream receives, end it
    stream_receives = 0  # receives of the stream since the last payload receive
    write_size = 0
    for count, into_payload, arriving in receives:
        size.received(count, into_payload, arriving if into_payload else 0)
        if into_payload:
            write_size = arriving or write_size
            streaming = write_size > RECV_SIZE
            stream_receives = 0
        else:
            stream_receives += 1
            if stream_receives >= 2:
                streaming = False
        assert size.next == (header if streaming else RECV_SIZE)


@given(st.sampled_from([0, 28, 32]), _RECEIVES, st.integers(0, 4 * RECV_SIZE))
def test_while_not_streaming_a_receive_of_the_stream_changes_nothing(
    header: int, receives: list[tuple[int, bool, int]], count: int
) -> None:
    """What ServerSessionLogic.answer_lone_read relies on to skip the call: with ``next`` at RECV_SIZE, a
    receive of the stream's bytes (of any size) leaves every part of the state as it was."""
    size = ReceiveSize()
    if header:
        size.in_place(header)
    for received, into_payload, arriving in receives:
        size.received(received, into_payload, arriving if into_payload else 0)
    if size.next != RECV_SIZE:
        return
    before = [getattr(size, name) for name in ReceiveSize.__slots__]
    size.received(count, False)
    assert [getattr(size, name) for name in ReceiveSize.__slots__] == before


@given(st.integers(1, 64 << 20))
def test_streamed_receives_are_a_whole_number_of_writes_near_the_stream_size(write_size: int) -> None:
    asked = ReceiveSize.streaming(write_size)
    if write_size <= STREAM_RECV_SIZE + 32:  # the whole number of writes nearest STREAM_RECV_SIZE
        assert asked % write_size == 0 and asked >= write_size
        assert abs(asked - STREAM_RECV_SIZE) <= (write_size + 1) // 2
        assert asked <= STREAM_RECV_SIZE * 4 // 3 + 32
    else:  # a write bigger than a receive: what a client sends never makes a receive bigger
        assert asked == STREAM_RECV_SIZE
    assert ReceiveSize.streaming(0) == STREAM_RECV_SIZE


def _transmitting(device: MemoryDevice, *, extended: bool = False) -> nbdproto.serving.ServerSessionLogic:
    logic = nbdproto.serving.ServerSessionLogic(nbdproto.serving.SessionSettings())
    logic.engine.data_to_send()
    options = option(nbdproto.Option.EXTENDED_HEADERS) if extended else b""
    logic.received(client_flags() + options + option(nbdproto.Option.GO, info_payload("")))
    assert logic.handshake_step() is HandshakeStep.DONE
    assert logic.offer_export(device, read_only=False)
    return logic


def _feed(
    logic: nbdproto.serving.ServerSessionLogic, stream: bytes, into_payload: list[int] | None = None
) -> list[int]:
    """Hand ``stream`` to the session as a driver would (receives of ``receive_size``, the rest of a payload
    straight into its buffer), carrying out what arrives; the size asked of each receive of the stream (and
    in ``into_payload``, the wire size of each write whose payload was received into its own buffer)."""
    asked, pos = [], 0
    while pos < len(stream):
        target = logic.engine.write_buffer()
        if target is not None:
            if into_payload is not None:
                into_payload.append(logic.engine.arriving_write_size)
            count = min(len(target), len(stream) - pos)
            target[:count] = stream[pos : pos + count]
            logic.received_into_payload(count)
        else:
            asked.append(logic.receive_size)
            count = min(logic.receive_size, len(stream) - pos)
            logic.received(stream[pos : pos + count])
        pos += count
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
    return asked


def _writes(first_cookie: int, count: int, size: int, *, extended: bool = False) -> bytes:
    flags = nbdproto.CommandFlags.PAYLOAD_LEN if extended else 0
    return b"".join(
        request(Command.WRITE, cookie, cookie * size, size, flags, extended=extended) + bytes([cookie & 0xFF]) * size
        for cookie in range(first_cookie, first_cookie + count)
    )


def test_a_session_asks_for_more_while_big_writes_stream_in_and_less_once_they_stop() -> None:
    device = MemoryDevice(64 << 20)
    logic = _transmitting(device)
    straddling: list[int] = []
    asked = _feed(logic, _writes(1, 24, 256 << 10), straddling)  # 256 KiB writes, as nbdcopy sends them
    whole = 28 + (256 << 10)  # a write on the wire: compact header and payload
    assert asked[0] == RECV_SIZE and asked[-1] == ReceiveSize.streaming(whole) == 4 * whole
    assert len(asked) < 24  # several whole writes a receive, not two receives a write
    # Receives of whole writes end where a write ends: only the write under way when streaming began straddled
    # two receives (1 MiB receives would have cut every fourth).
    assert straddling == [whole]
    for cookie in range(1, 25):
        buffer = bytearray(256 << 10)
        device.pread_into(memoryview(buffer), cookie << 18)
        assert buffer == bytes([cookie]) * (256 << 10)
    _feed(logic, _writes(100, 4, 4096))  # the rest of the stream is small: back to small receives
    assert logic.receive_size == RECV_SIZE


def test_with_extended_headers_the_receives_count_their_longer_header() -> None:
    device = MemoryDevice(64 << 20)
    logic = _transmitting(device, extended=True)
    straddling: list[int] = []
    size = 300 << 10  # not a divisor of STREAM_RECV_SIZE either
    asked = _feed(logic, _writes(1, 24, size, extended=True), straddling)
    whole = 32 + size
    assert asked[-1] == ReceiveSize.streaming(whole) == 3 * whole
    assert straddling == [whole]
    for cookie in (1, 24):
        buffer = bytearray(size)
        device.pread_into(memoryview(buffer), cookie * size)
        assert buffer == bytes([cookie]) * size


def test_small_writes_never_grow_it() -> None:
    logic = _transmitting(MemoryDevice(64 << 20))
    asked = _feed(logic, _writes(1, 1024, 4096))  # 4 KiB writes, 16 a receive (fio at queue depth 16)
    assert set(asked) == {RECV_SIZE}


def test_the_threads_server_waits_for_a_quiet_client_with_a_small_buffer() -> None:
    # A receive holds its buffer while it waits: after streaming big writes, the large receives are made only
    # for bytes already here, and a client gone quiet is waited for with a RECV_SIZE one.
    server_sock, client_sock = socket.socketpair()
    session = nbdproto_threads.ServerSession(server_sock, nbdproto.serving.SessionSettings())
    asked: list[tuple[str, int]] = []

    class Recording(type(session.stream)):  # type: ignore[misc]
        __slots__ = ()

        def recv(self, size: int = RECV_SIZE) -> bytes:
            asked.append(("wait", size))
            return super().recv(size)  # type: ignore[no-any-return]

        def recv_ready(self, size: int) -> bytes | None:
            asked.append(("ready", size))
            return super().recv_ready(size)  # type: ignore[no-any-return]

    session.stream = Recording(server_sock)
    device = MemoryDevice(16 << 20)

    def serve() -> None:
        with session:
            if session.negotiate() == "":
                session.serve(device, read_only=False)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = RawClient(client_sock)
    client.go("")
    client_sock.sendall(_writes(1, 16, 256 << 10))
    for cookie in range(1, 17):
        assert client.simple_reply(cookie) == (0, b"")
    wait_until(lambda: asked and asked[-1] == ("wait", RECV_SIZE), "the session waiting with a small receive")
    streamed = ReceiveSize.streaming(28 + (256 << 10))
    assert ("ready", streamed) in asked  # it streamed with large receives...
    assert asked[-1] == ("wait", RECV_SIZE)  # ...and waits for the quiet client with a small one
    assert ("wait", streamed) not in asked
    client_sock.close()
    server.join(10)
    assert not server.is_alive()
    buffer = bytearray(256 << 10)
    device.pread_into(memoryview(buffer), 16 << 18)
    assert buffer == bytes([16]) * (256 << 10)


@pytest.mark.parametrize("header_size", [28, 32])
def test_a_payload_and_its_header_in_one_call_leave_the_size_as_two_calls_do(header_size: int) -> None:
    """ReceiveSize.received_payload_and_header (ServerSessionLogic.received_in_place, when the engine handed a
    write over) says what ``received`` says of the payload's part and then of the header's, from every state a
    stream of writes of these sizes leads to."""
    sizes = [RECV_SIZE - header_size - 1, RECV_SIZE - header_size, RECV_SIZE, RECV_SIZE + 1, 256 << 10, 4096]
    for first in sizes:
        for write_size in sizes:
            one, two = ReceiveSize(), ReceiveSize()
            for size in (one, two):
                size.in_place(header_size)
                size.received(first - header_size, True, first)  # a write before, then a header alone
                size.received(header_size, False)
            one.received_payload_and_header(write_size)
            two.received(write_size - header_size, True, write_size)
            two.received(header_size, False)
            state = ("next", "streaming_in_place", "_streaming", "_write_size", "_header_received")
            assert [getattr(one, a) for a in state] == [getattr(two, a) for a in state], (first, write_size)
