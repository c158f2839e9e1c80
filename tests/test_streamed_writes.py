"""Writes larger than nbdproto.serving.STREAM_WRITES_OVER whose payload is still arriving are carried out part by part
(WriteRequest with ``more``, then WritePayload events): the parts land in order and the write is answered once,
after its last part; one whose first part comes after the server began shutting down is refused whole, with
ESHUTDOWN after its last part, and none of it is written."""

from __future__ import annotations

import nbdproto
import nbdproto.serving
from nbdproto import Command, Errno
from nbdproto.devices import MemoryDevice
from nbdproto.serving import STREAM_WRITES_OVER
from tests.nbdbytes import request
from tests.test_receive_size import _transmitting

SIZE = 2 * STREAM_WRITES_OVER
FIRST = 100_000  # bytes of the payload that arrive with the header


def _carry_out(logic: nbdproto.serving.ServerSessionLogic, received: bytes) -> list[nbdproto.Payload]:
    """Hand ``received`` to the session, carry out what it holds, and return the replies queued."""
    logic.received(received)
    for step in logic.inline_transmission(None):
        if step is nbdproto.serving.RECEIVE:
            break
    return logic.engine.data_to_send()


def _simple_reply(cookie: int, error: int = 0) -> bytes:
    return (0x67446698).to_bytes(4, "big") + error.to_bytes(4, "big") + cookie.to_bytes(8, "big")


def _stored(device: MemoryDevice, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    device.pread_into(memoryview(buffer), offset)
    return bytes(buffer)


def test_a_streamed_write_lands_in_order_and_is_answered_after_its_last_part() -> None:
    device = MemoryDevice(4 * SIZE)
    logic = _transmitting(device)
    logic.engine.data_to_send()
    payload = bytes(range(256)) * (SIZE // 256)
    assert _carry_out(logic, request(Command.WRITE, 7, SIZE, SIZE) + payload[:FIRST]) == []
    assert _stored(device, SIZE, FIRST) == payload[:FIRST]  # the first part is written before the rest is in
    replies = _carry_out(logic, payload[FIRST:])
    assert b"".join(replies) == _simple_reply(7)
    assert _stored(device, SIZE, SIZE) == payload


def test_a_streamed_write_that_begins_during_shutdown_is_refused_whole() -> None:
    # Its parts were carried out although its first part had been refused; the reply after its last part then
    # answered a cookie already answered, and the connection failed with LocalProtocolError.
    device = MemoryDevice(4 * SIZE)
    logic = _transmitting(device)
    logic.engine.data_to_send()
    logic.begin_shutdown()
    assert _carry_out(logic, request(Command.WRITE, 7, 0, SIZE) + b"\x01" * FIRST) == []
    replies = _carry_out(logic, b"\x01" * (SIZE - FIRST))
    assert b"".join(replies) == _simple_reply(7, Errno.ESHUTDOWN)
    assert _stored(device, 0, SIZE) == bytes(SIZE)  # none of it was written


def test_a_streamed_write_under_way_when_shutdown_begins_is_finished() -> None:
    device = MemoryDevice(4 * SIZE)
    logic = _transmitting(device)
    logic.engine.data_to_send()
    assert _carry_out(logic, request(Command.WRITE, 7, 0, SIZE) + b"\x01" * FIRST) == []
    logic.begin_shutdown()  # the write was taken on before: it is carried out to its end
    replies = _carry_out(logic, b"\x01" * (SIZE - FIRST))
    assert b"".join(replies) == _simple_reply(7)
    assert _stored(device, 0, SIZE) == b"\x01" * SIZE
