"""How much a server asks of each receive (nbdproto.ReceiveSize, kept by ServerSessionLogic): RECV_SIZE while
requests are small, STREAM_RECV_SIZE while the client streams writes bigger than a receive, and back again once
it stops; a model compared with every sequence of receives hypothesis makes, and a session fed real requests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import nbdproto
from nbdproto import RECV_SIZE, STREAM_RECV_SIZE, Command, HandshakeStep, ReceiveSize
from nbdproto.devices import MemoryDevice
from tests.nbdbytes import client_flags, info_payload, option, request

_RECEIVES = st.lists(st.tuples(st.integers(0, 4 * RECV_SIZE), st.booleans()), max_size=50)


@given(_RECEIVES)
def test_the_size_follows_the_last_receive_that_said_something(receives: list[tuple[int, bool]]) -> None:
    size = ReceiveSize()
    streaming = False  # the model: a big receive into a payload starts it, a short receive of the stream ends it
    for count, into_payload in receives:
        size.received(count, into_payload)
        if into_payload and count >= RECV_SIZE:
            streaming = True
        elif not into_payload and count < RECV_SIZE:
            streaming = False
        assert size.next == (STREAM_RECV_SIZE if streaming else RECV_SIZE)


def _transmitting(device: MemoryDevice) -> nbdproto.ServerSessionLogic:
    logic = nbdproto.ServerSessionLogic(nbdproto.SessionSettings())
    logic.engine.data_to_send()
    logic.received(client_flags() + option(nbdproto.Option.GO, info_payload("")))
    assert logic.handshake_step() is HandshakeStep.DONE
    assert logic.offer_export(device, read_only=False)
    return logic


def _feed(logic: nbdproto.ServerSessionLogic, stream: bytes) -> list[int]:
    """Hand ``stream`` to the session as a driver would (receives of ``receive_size``, the rest of a payload
    straight into its buffer), carrying out what arrives; the size asked of each receive of the stream."""
    asked, pos = [], 0
    while pos < len(stream):
        target = logic.engine.write_buffer()
        if target is not None:
            count = min(len(target), len(stream) - pos)
            target[:count] = stream[pos : pos + count]
            logic.received(count)
        else:
            asked.append(logic.receive_size)
            count = min(logic.receive_size, len(stream) - pos)
            logic.received(stream[pos : pos + count])
        pos += count
        for step in logic.inline_transmission(None):
            if step == nbdproto.RECEIVE:
                break
    return asked


def _writes(first_cookie: int, count: int, size: int) -> bytes:
    return b"".join(
        request(Command.WRITE, cookie, cookie * size, size) + bytes([cookie & 0xFF]) * size
        for cookie in range(first_cookie, first_cookie + count)
    )


def test_a_session_asks_for_more_while_big_writes_stream_in_and_less_once_they_stop() -> None:
    device = MemoryDevice(64 << 20)
    logic = _transmitting(device)
    asked = _feed(logic, _writes(1, 24, 256 << 10))  # 256 KiB writes, as nbdcopy sends them
    assert asked[0] == RECV_SIZE and asked[-1] == STREAM_RECV_SIZE
    assert len(asked) < 24  # several whole writes a receive, not two receives a write
    for cookie in range(1, 25):
        buffer = bytearray(256 << 10)
        device.pread_into(memoryview(buffer), cookie << 18)
        assert buffer == bytes([cookie]) * (256 << 10)
    _feed(logic, _writes(100, 4, 4096))  # the rest of the stream is small: back to small receives
    assert logic.receive_size == RECV_SIZE


def test_small_writes_never_grow_it() -> None:
    logic = _transmitting(MemoryDevice(64 << 20))
    asked = _feed(logic, _writes(1, 1024, 4096))  # 4 KiB writes, 16 a receive (fio at queue depth 16)
    assert set(asked) == {RECV_SIZE}
