"""One server connection's logic in transmission, without I/O (nbdproto.serving.ServerSessionLogic, its
transmission half): how long the driver may wait in each state and what it says when a wait runs out, whether
the connection is idle or part-way through a request, how a batch of requests ends, what shutting down answers,
and where the bytes of an in-place receive go (0 bytes: the client closed)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

import nbdproto
import nbdproto.engine
import nbdproto.serving
from nbdproto.devices import MemoryDevice
from nbdproto.serving import BatchEnd, ServerLimits
from nbdproto.wire import Command, CommandFlags
from tests.nbdbytes import client_flags, info_payload, option, replies, request
from tests.test_writes_in_place import SHM, CountingFile, _in_place_session, _writes

LIMITS = ServerLimits(request_timeout=7.0, idle_timeout=90.0)


def session(limits: ServerLimits = LIMITS, *, structured: bool = False) -> nbdproto.serving.ServerSessionLogic:
    """A session with ``limits`` in transmission on a 1 MiB memory device (structured replies if asked)."""
    logic = nbdproto.serving.ServerSessionLogic(nbdproto.serving.SessionSettings(limits=limits))
    logic.engine.data_to_send()
    options = option(nbdproto.Option.STRUCTURED_REPLY) if structured else b""
    logic.received(client_flags() + options + option(nbdproto.Option.GO, info_payload("")))
    assert logic.handshake_step() is nbdproto.engine.HandshakeStep.DONE
    assert logic.offer_export(MemoryDevice(1 << 20), read_only=False)
    logic.engine.data_to_send()
    return logic


def test_the_wait_in_each_state() -> None:
    logic = session()
    assert (logic.idle, logic.mid_request, logic.next_wait()) == (True, False, 90.0)  # idle: the idle limit
    logic.received(request(Command.READ, 1, 0, 512)[:10])
    assert (logic.idle, logic.mid_request, logic.next_wait()) == (False, True, 7.0)  # part of a request
    logic.received(request(Command.READ, 1, 0, 512)[10:])
    batch: list[object] = []
    assert logic.next_batch(batch) is BatchEnd.NEED_DATA and len(batch) == 1
    assert (logic.idle, logic.mid_request, logic.next_wait()) == (False, False, None)  # in flight: no limit
    logic.begin_shutdown()
    assert logic.next_wait() == 0.05  # shutting down: a moment, to take what is on its way (it gets ESHUTDOWN)
    logic.engine.send(nbdproto.ReadData(1, 0, bytes(512)))
    assert (logic.idle, logic.next_wait()) == (True, 0.05)
    logic.received(request(Command.READ, 2, 0, 512)[:3])
    assert logic.next_wait() == 7.0  # part of a request: its limit, shutting down or not


def test_limits_of_none_or_zero_wait_for_ever() -> None:
    for limits in (
        ServerLimits(request_timeout=None, idle_timeout=None),
        ServerLimits(request_timeout=0, idle_timeout=0),
    ):
        logic = session(limits)
        assert logic.next_wait() is None and logic.shortest_wait is None
        logic.received(b"\x25")
        assert logic.next_wait() is None
    assert session().shortest_wait == 7.0
    assert session(ServerLimits(request_timeout=9.0, idle_timeout=2.0)).shortest_wait == 2.0
    assert session(ServerLimits(request_timeout=9.0, idle_timeout=None)).shortest_wait == 9.0


def test_a_wait_that_runs_out_part_way_through_a_request_is_a_timeout_in_words() -> None:
    logic = session()
    logic.received(request(Command.WRITE, 1, 0, 4096) + bytes(100))
    logic.next_batch([])
    with pytest.raises(TimeoutError) as ran_out:
        logic.wait_ran_out()
    assert str(ran_out.value) == "the rest of a request did not arrive within 7.0 s"


def test_a_wait_that_runs_out_while_idle_ends_the_connection_as_a_close_would() -> None:
    logic = session()
    logic.wait_ran_out()
    assert logic.next_batch([]) is BatchEnd.CLOSED


def test_a_batch_holds_the_requests_and_says_how_it_ended() -> None:
    logic = session()
    logic.received(request(Command.READ, 1, 0, 512) + request(Command.FLUSH, 2) + request(Command.DISC, 3))
    batch: list[object] = []
    assert logic.next_batch(batch) is BatchEnd.PAUSED  # DISC with replies owed: they go first
    assert [type(r) for r in batch] == [nbdproto.ReadRequest, nbdproto.FlushRequest]  # DISC noted, not returned
    closed = session()
    closed.received(b"")
    assert closed.next_batch([]) is BatchEnd.CLOSED


def test_shutting_down_answers_new_requests_eshutdown_in_words() -> None:
    logic = session(structured=True)
    logic.begin_shutdown()
    logic.received(request(Command.FLUSH, 4))
    for step in logic.inline_transmission(None):
        if step is nbdproto.serving.RECEIVE:
            break
    (chunk,) = replies(b"".join(bytes(piece) for piece in logic.engine.data_to_send()))
    assert (chunk.cookie, chunk.error, chunk.fields.message) == (
        4,
        nbdproto.Errno.ESHUTDOWN,
        "the server is shutting down",
    )
    assert nbdproto.serving._session_pipelining.SHUTTING_DOWN == "the server is shutting down"


@pytest.fixture
def shm_file() -> Iterator[str]:
    """A 16 MiB file of zeroes on tmpfs (tests/test_writes_in_place.py has the same)."""
    with tempfile.NamedTemporaryFile(dir=SHM, prefix="nbdproto-session-") as file:
        file.write(bytes(16 << 20))
        file.flush()
        yield file.name


def _streaming_in_place(shm_file: str) -> nbdproto.serving.ServerSessionLogic:
    device = CountingFile(shm_file)
    logic = _in_place_session(device)
    stream = _writes(1, 2, 256 << 10)
    pos = 0
    while pos < len(stream):  # as tests/test_receive_size.py's _feed does, until writes stream in place
        target = logic.engine.write_buffer()
        room = len(target) if target is not None else logic.receive_size
        count = min(room, len(stream) - pos)
        if target is not None:
            target[:count] = stream[pos : pos + count]
            logic.received_into_payload(count)
        else:
            logic.received(stream[pos : pos + count])
        pos += count
        for step in logic.inline_transmission(None):
            if step is nbdproto.serving.RECEIVE:
                break
    logic.engine.data_to_send()
    assert logic.in_place_buffers() is not None
    return logic


def test_an_in_place_receive_of_nothing_between_writes_is_the_client_closing(shm_file: str) -> None:
    logic = _streaming_in_place(shm_file)
    assert [len(b) for b in logic.in_place_buffers() or []] == [28]  # a header alone
    logic.received_in_place(0)
    assert logic.next_batch([]) is BatchEnd.CLOSED


def test_an_in_place_receive_of_nothing_mid_payload_is_the_client_closing(shm_file: str) -> None:
    logic = _streaming_in_place(shm_file)
    buffers = logic.in_place_buffers()
    assert buffers is not None
    header = request(Command.WRITE, 3, 3 << 18, 256 << 10)
    buffers[0][:] = header
    logic.received_in_place(len(header))
    logic.next_batch([])
    buffers = logic.in_place_buffers()
    assert buffers is not None and [len(b) for b in buffers] == [256 << 10, 28]  # the payload's place, a header
    buffers[0][:100] = b"\x03" * 100
    logic.received_in_place(100)
    assert logic.mid_request
    logic.received_in_place(0)  # the client closed, 100 bytes into the payload: the connection ends
    assert logic.next_batch([]) is BatchEnd.CLOSED


def test_an_in_place_receive_that_brings_the_payload_and_a_header_after_it(shm_file: str) -> None:
    logic = _streaming_in_place(shm_file)
    buffers = logic.in_place_buffers()
    assert buffers is not None
    buffers[0][:] = request(Command.WRITE, 3, 3 << 18, 4096, CommandFlags.FUA)
    logic.received_in_place(28)
    batch: list[object] = []
    logic.next_batch(batch)
    buffers = logic.in_place_buffers()
    assert buffers is not None and [len(b) for b in buffers] == [4096, 28]
    buffers[0][:] = b"\x05" * 4096
    buffers[1][:] = request(Command.FLUSH, 4)
    logic.received_in_place(4096 + 28)
    logic.next_batch(batch)
    write, flush = batch
    assert write.in_place and write.flags == CommandFlags.FUA and type(flush) is nbdproto.FlushRequest  # type: ignore[union-attr]


def test_replies_wait_for_at_most_ready_in_a_row_receives_from_the_start(shm_file: str) -> None:
    """Every run of receives that found bytes, the first one too, is READY_IN_A_ROW long before replies go out
    (tests/test_writes_in_place.py shows a client that never stops sending getting its replies)."""
    logic = _streaming_in_place(shm_file)
    stream = _writes(3, 190, 64 << 10)  # all inside the 16 MiB file
    pos, streak, streaks = 0, 0, []
    steps = logic.inline_transmission(None)
    found: int | None = None
    while pos < len(stream):
        step = steps.send(found)
        found = None
        if step not in (nbdproto.serving.RECEIVE_READY, nbdproto.serving.RECEIVE):
            continue
        if step is nbdproto.serving.RECEIVE:
            streaks.append(streak)
            streak = 0
            logic.engine.data_to_send()
        buffers = logic.in_place_buffers()
        assert buffers is not None, (pos, len(stream), step, streaks, streak)
        count = 0
        for buffer in buffers:
            part = stream[pos + count : pos + count + len(buffer)]
            buffer[: len(part)] = part
            count += len(part)
        pos += count
        if step is nbdproto.serving.RECEIVE_READY:
            streak += 1
            found = count
        else:
            logic.received_in_place(count)
    assert len(streaks) >= 2 and set(streaks) == {nbdproto.serving.READY_IN_A_ROW}


def test_a_request_refused_while_shutting_down_alone() -> None:
    """refused_shutting_down (for drivers that carry requests out concurrently): False, and nothing answered,
    until the server shuts down; then ESHUTDOWN for every request but a write received in place (its data is in
    the device already: it is carried out)."""
    logic = session()
    logic.received(request(Command.READ, 4, 0, 512))
    batch: list[nbdproto.serving.Work] = []
    logic.next_batch(batch)
    (read,) = batch
    assert type(read) is nbdproto.ReadRequest
    assert logic.refused_shutting_down(read) is False
    assert logic.engine.data_to_send() == []
    logic.begin_shutdown()
    assert logic.refused_shutting_down(nbdproto.WriteRequest(6, 0, b"x" * 512, in_place=True)) is False
    assert logic.engine.data_to_send() == []
    assert logic.refused_shutting_down(read) is True
    (reply,) = replies(b"".join(bytes(piece) for piece in logic.engine.data_to_send()))
    assert (reply.cookie, reply.error) == (4, nbdproto.Errno.ESHUTDOWN)


class _Submitting(MemoryDevice):
    """A memory device that says it takes calls without waiting for them (``submit``); never called here."""

    def submit(self, calls: object, tokens: object, completions: object) -> None:
        raise AssertionError("not called")


def test_a_pipeline_only_for_a_device_that_takes_calls_without_waiting() -> None:
    assert session().pipeline(lambda: None) is None
    logic = nbdproto.serving.ServerSessionLogic(nbdproto.serving.SessionSettings())
    logic.engine.data_to_send()
    logic.received(client_flags() + option(nbdproto.Option.GO, info_payload("")))
    assert logic.handshake_step() is nbdproto.engine.HandshakeStep.DONE
    assert logic.offer_export(_Submitting(1 << 20), read_only=False)
    assert type(logic.pipeline(lambda: None)) is nbdproto.serving.Pipeline
