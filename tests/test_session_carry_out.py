"""How one connection's logic carries requests out on its device, without I/O (nbdproto.serving.ServerSessionLogic):
what the replies it queues hold of the server's memory and when it gives it back, when it asks its driver to
send, what a device's failure becomes (and which failures are reported as bugs), what shutting down refuses, the
parts of a streamed write (FUA a flush at the end; a failed part failing the write), and the same for a device
that takes a batch of calls at once (NbdDevice, on a server of ours in this process)."""

from __future__ import annotations

import errno
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import nbdproto
import nbdproto.engine
import nbdproto.serving
from nbdproto import Command, CommandFlags, Errno
from nbdproto.devices import FileDevice, Filter, MemoryDevice, NbdDevice
from nbdproto.serving import FLUSH_AT, RECEIVE, SEND, STREAM_WRITES_OVER, MemoryBudget, WaitForBudget
from tests.nbdbytes import client_flags, info_payload, option, replies, request
from tests.serving import Export, serve_exports

MIB = 1 << 20


class Counted(Filter):
    """A device whose reads, writes and flushes are counted (and that fails them on demand)."""

    def __init__(self, inner: Any, fail: BaseException | None = None) -> None:
        super().__init__(inner)
        self.reads = self.writes = self.flushes = 0
        self.fuas: list[object] = []  # the fua argument of each write, as given
        self.fail = fail

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        self.inner.pread_into(buffer, offset)

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        self.writes += 1
        self.fuas.append(fua)
        if self.fail is not None:
            raise self.fail
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self.flushes += 1
        self.inner.flush()


def session(device: Any, *, share: Any = None, structured: bool = False, on_error: Any = None) -> Any:
    logic = nbdproto.serving.ServerSessionLogic(
        nbdproto.serving.SessionSettings(), share=share, on_device_error=on_error
    )
    logic.engine.data_to_send()
    options = option(nbdproto.Option.STRUCTURED_REPLY) if structured else b""
    logic.received(client_flags() + options + option(nbdproto.Option.GO, info_payload("")))
    assert logic.handshake_step() is nbdproto.engine.HandshakeStep.DONE
    assert logic.offer_export(device, read_only=False)
    logic.engine.data_to_send()
    return logic


def steps_for(logic: Any, received: bytes, read_view: Any = None) -> list[object]:
    """Hand ``received`` over and take the steps of carrying it out up to the next receive."""
    logic.received(received)
    taken = []
    for step in logic.inline_transmission(read_view):
        taken.append(step)
        if step is RECEIVE:
            return taken
    raise AssertionError("the steps ended")


def sent(logic: Any, lengths: dict[int, int] | None = None) -> list[Any]:
    """The replies queued (``lengths``: the read of each cookie answered with data), handed to the driver."""
    out = b"".join(bytes(piece) for piece in logic.engine.data_to_send())
    logic.sent()
    return replies(out, lengths or {})


def reads(count: int, size: int = MIB, first: int = 1) -> bytes:
    return b"".join(request(Command.READ, first + i, i * size, size) for i in range(count))


def test_read_replies_hold_their_memory_until_sent() -> None:
    budget = MemoryBudget(64 * MIB)
    device = Counted(MemoryDevice(16 * MIB))
    logic = session(device, share=budget.share())
    steps_for(logic, reads(2, 512 * 1024))
    assert budget.used == MIB and device.reads == 2  # made, queued, not sent
    assert [c.cookie for c in sent(logic, {1: 512 * 1024, 2: 512 * 1024})] == [1, 2]
    assert budget.used == 0 and budget.holders == 0


class _CountedShare:
    """A connection's share of the budget that records each take and give."""

    def __init__(self, share: Any) -> None:
        self.share = share
        self.calls: list[tuple[str, int]] = []

    @property
    def held(self) -> int:
        return int(self.share.held)

    def try_take(self, amount: int) -> bool:
        self.calls.append(("take", amount))
        return bool(self.share.try_take(amount))

    def give(self, amount: int) -> None:
        self.calls.append(("give", amount))
        self.share.give(amount)

    def give_all(self) -> None:
        self.share.give_all()


def test_reads_into_kept_buffers_are_admitted_with_the_share_the_buffers_hold() -> None:
    """With reused read buffers (a TLS connection's), a read of a kept buffer's size gets the buffer and, as its
    budget, the share of memory the buffer holds: nothing is taken or given for it, the share holds the same
    throughout, and each read's reply carries its own data; a read of another size takes its own budget."""
    budget = MemoryBudget(64 * MIB)
    share = _CountedShare(budget.share())
    device = MemoryDevice(MIB)
    data = bytes(range(256)) * (MIB // 256)
    device.pwrite(data, 0)
    logic = session(device, share=share)
    logic.reuse_read_buffers()
    steps_for(logic, reads(4, 4096))
    sent(logic, {cookie: 4096 for cookie in range(1, 5)})
    assert share.held == 4 * 4096 == logic._reply_buffers.kept  # kept, held from the share
    share.calls.clear()
    steps_for(logic, b"".join(request(Command.READ, 5 + i, 4096 * (i + 7) + 3, 4096) for i in range(4)))
    assert share.calls == [] and share.held == 4 * 4096 and logic._reply_buffers.kept == 0
    answered = sent(logic, {cookie: 4096 for cookie in range(5, 9)})
    assert [bytes(reply.data) for reply in answered] == [
        data[4096 * (i + 7) + 3 : 4096 * (i + 8) + 3] for i in range(4)
    ]
    assert share.held == 4 * 4096 == logic._reply_buffers.kept  # kept again
    share.calls.clear()
    steps_for(logic, request(Command.READ, 9, 0, 8192))
    assert share.calls == [("take", 8192)]  # no buffer of its size: its own budget
    sent(logic, {9: 8192})
    assert budget.used == share.held == logic._reply_buffers.kept


class _CopyCounted(FileDevice):
    """A file device that counts the reads it copies into a buffer (pread_into), rather than hands out as views."""

    copies = 0

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.copies += 1
        super().pread_into(buffer, offset)


def test_reads_from_views_hold_no_memory_of_the_budget() -> None:
    budget = MemoryBudget(64 * MIB)
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as file:
        file.write(bytes(4 * MIB))
        file.flush()
        with _CopyCounted(file.name) as device:
            logic = session(device, share=budget.share())
            view = logic.read_view(kernel_sends=True)
            assert view is not None
            steps_for(logic, reads(2, 512 * 1024), view)
            assert budget.used == 0 and device.copies == 0  # views of the file: nothing read into a buffer
            assert len(sent(logic, {1: 512 * 1024, 2: 512 * 1024})) == 2


def test_reads_with_no_budget_at_all() -> None:
    logic = session(MemoryDevice(16 * MIB))
    steps_for(logic, reads(3))
    assert [c.cookie for c in sent(logic, dict.fromkeys((1, 2, 3), MIB))] == [1, 2, 3]


@pytest.mark.parametrize("size", [MIB, FLUSH_AT // 4 - 1])
def test_replies_go_out_once_flush_at_bytes_are_queued(size: int) -> None:
    device = Counted(MemoryDevice(32 * MIB))
    logic = session(device)
    logic.received(reads(8, size))
    made_at_send = []
    for step in logic.inline_transmission(None):
        if step is SEND:
            made_at_send.append(device.reads)
            logic.engine.data_to_send()
            logic.sent()
        if step is RECEIVE:
            break
    whole = -(-FLUSH_AT // size)  # the reads it takes to reach FLUSH_AT
    assert made_at_send[0] == whole


def test_a_read_the_budget_has_no_room_for_waits() -> None:
    budget = MemoryBudget(MIB)
    other = budget.share()
    assert other.try_take(MIB)  # another connection holds it all
    logic = session(MemoryDevice(16 * MIB), share=budget.share())
    logic.received(reads(2, 2 * MIB))
    steps = logic.inline_transmission(None)
    first = next(steps)
    assert type(first) is WaitForBudget and first.amount == 2 * MIB


def test_a_read_that_waited_for_budget_goes_on_and_sees_a_shutdown_begun_meanwhile() -> None:
    """The driver sends what is queued at WaitForBudget (then sent()), waits for the budget and takes it: the
    read is carried out, and a shutdown begun during the wait refuses the reads after it."""
    budget = MemoryBudget(MIB)
    other = budget.share()
    assert other.try_take(MIB)  # another connection holds it all: the first read has the share's guaranteed part
    logic = session(MemoryDevice(16 * MIB), share=budget.share())
    logic.received(reads(3, 512 * 1024))
    steps = logic.inline_transmission(None)
    assert repr(next(steps)) == "WaitForBudget(524288)"
    assert [(c.cookie, c.error) for c in sent(logic, {1: 512 * 1024})] == [(1, 0)]
    other.give(MIB)
    assert logic.share.try_take(512 * 1024)  # what the driver's share.take(step.amount) does
    logic.begin_shutdown()
    assert next(steps) is RECEIVE
    got = sent(logic, {2: 512 * 1024})
    assert [(c.cookie, c.error) for c in got] == [(2, 0), (3, Errno.ESHUTDOWN)]
    assert budget.used == 0


def test_reused_read_buffers_stay_held_from_the_budget_and_are_filled_again() -> None:
    """reuse_read_buffers: the buffers of replies sent are kept, held from the connection's share (so the budget
    shows them after sent()), and filled again by the next reads of their size."""
    budget = MemoryBudget(64 * MIB)
    device = MemoryDevice(MIB)
    device.pwrite(b"\x05" * 4096 + b"\x06" * 4096, 0)
    logic = session(device, share=budget.share())
    logic.reuse_read_buffers()
    steps_for(logic, request(Command.READ, 1, 0, 4096))
    assert budget.used == 4096
    (reply,) = sent(logic, {1: 4096})
    assert reply.data == b"\x05" * 4096 and budget.used == 4096  # kept for the next read of 4 KiB
    steps_for(logic, request(Command.READ, 2, 4096, 4096))
    assert budget.used == 4096  # the kept buffer, filled again: the read's own budget took its place
    (reply,) = sent(logic, {2: 4096})
    assert reply.data == b"\x06" * 4096 and budget.used == 4096


def test_kept_read_buffers_are_given_back_before_a_read_would_wait_for_budget() -> None:
    budget = MemoryBudget(MIB)
    logic = session(MemoryDevice(4 * MIB), share=budget.share())
    logic.reuse_read_buffers()
    steps_for(logic, reads(1, 512 * 1024))
    sent(logic, {1: 512 * 1024})
    assert budget.used == 512 * 1024  # kept
    taken = steps_for(logic, request(Command.READ, 2, 0, MIB))
    assert taken == [RECEIVE] and budget.used == MIB  # the kept buffer let go: the read fits, and does not wait
    assert [c.cookie for c in sent(logic, {2: MIB})] == [2]


def test_every_device_failure_is_reported_and_answered() -> None:
    """A bug and an OSError alike reach on_error (the log: a traceback, or one line with the detail the client
    is not told); the client gets EIO (or the OSError's errno) alone."""
    for failure, reported in ((ValueError("bug"), True), (OSError(errno.EIO, "disk"), True)):
        seen: list[tuple[object, BaseException]] = []
        logic = session(Counted(MemoryDevice(MIB), failure), on_error=lambda r, e, seen=seen: seen.append((r, e)))
        steps_for(logic, request(Command.READ, 1, 0, 512))
        (reply,) = sent(logic)
        assert reply.error == Errno.EIO
        assert [e for _, e in seen] == ([failure] if reported else [])


def test_shutting_down_refuses_every_request_of_a_batch() -> None:
    device = Counted(MemoryDevice(MIB))
    logic = session(device)
    logic.begin_shutdown()
    steps_for(logic, reads(3, 512) + request(Command.FLUSH, 9))
    assert [(c.cookie, c.error) for c in sent(logic)] == [(1, Errno.ESHUTDOWN), (2, Errno.ESHUTDOWN),
                                                          (3, Errno.ESHUTDOWN), (9, Errno.ESHUTDOWN)]  # fmt: skip
    assert device.reads == 0


def test_one_request_carried_out_alone_and_while_shutting_down() -> None:
    device = Counted(MemoryDevice(MIB))
    logic = session(device)
    reply = logic.carry_out_one(nbdproto.ReadRequest(4, 0, 512), None)
    assert isinstance(reply, nbdproto.ReadData) and device.reads == 1
    logic.begin_shutdown()
    assert logic.carry_out_one(nbdproto.ReadRequest(5, 0, 512), None) == nbdproto.ErrorReply(
        5, Errno.ESHUTDOWN, "the server is shutting down"
    )
    written = nbdproto.WriteRequest(6, 0, b"x" * 512, in_place=True)  # its data is in the device already
    assert logic.carry_out_one(written, None) == nbdproto.SuccessReply(6)


SIZE = 2 * STREAM_WRITES_OVER


@pytest.mark.parametrize("fua", [False, True])
def test_a_streamed_write_with_fua_is_flushed_once_after_its_last_part(fua: bool) -> None:
    device = Counted(MemoryDevice(4 * SIZE))
    logic = session(device)
    flags = CommandFlags.FUA if fua else 0
    steps_for(logic, request(Command.WRITE, 7, 0, SIZE, flags) + b"\x01" * 1000)
    assert device.writes >= 1 and device.flushes == 0 and sent(logic) == []
    steps_for(logic, b"\x01" * (SIZE - 1000))
    assert device.flushes == (1 if fua else 0)
    assert [(c.cookie, c.error) for c in sent(logic)] == [(7, 0)]
    assert device.fuas == [False] * (device.writes - 1) + [fua]  # False, not merely falsy: a device may test `is`


@pytest.mark.parametrize(("failure", "reported"), [(OSError(errno.ENOSPC, "full"), True), (ValueError("bug"), True)])
def test_a_failed_part_fails_the_whole_streamed_write(failure: BaseException, reported: bool) -> None:
    seen: list[BaseException] = []
    device = Counted(MemoryDevice(4 * SIZE), failure)
    logic = session(device, on_error=lambda r, e: seen.append(e))
    steps_for(logic, request(Command.WRITE, 7, 0, SIZE) + b"\x01" * 1000)
    steps_for(logic, b"\x01" * (SIZE - 1000))
    assert device.writes == 1  # the rest is received and dropped
    expected = Errno.ENOSPC if isinstance(failure, OSError) else Errno.EIO
    assert [(c.cookie, c.error) for c in sent(logic)] == [(7, expected)]
    assert seen == ([failure] if reported else [])


# --- A device that takes a batch of calls at once ------------------------------------------------------------


class Batching(MemoryDevice):
    """A memory device that takes a batch of calls at once (``call_batch``), and records how many each held."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.batches: list[int] = []

    def call_batch(self, calls: list[nbdproto.serving.DeviceCall]) -> list[object]:
        self.batches.append(len(calls))
        results: list[object] = []
        for call in calls:
            try:
                results.append(getattr(self, call.method)(*call.args, **call.kwargs))
            except Exception as exc:
                results.append(exc)
        return results


def test_a_batched_device_gets_each_run_of_requests_in_one_call() -> None:
    device = Batching(16 * MIB)
    logic = session(device)
    steps_for(logic, reads(3, 4096) + request(Command.FLUSH, 9))
    assert device.batches == [4]
    assert [c.cookie for c in sent(logic, dict.fromkeys((1, 2, 3), 4096))] == [1, 2, 3, 9]


def test_a_batched_run_waits_for_its_budget_only_when_the_share_has_no_room() -> None:
    budget = MemoryBudget(64 * MIB)
    logic = session(Batching(16 * MIB), share=budget.share())
    assert steps_for(logic, reads(2)) == [RECEIVE]  # room: no wait
    assert budget.used == 2 * MIB
    budget = MemoryBudget(MIB)
    other = budget.share()
    assert other.try_take(MIB)  # another connection holds it all
    logic = session(Batching(16 * MIB), share=budget.share())
    logic.received(reads(2))
    first = next(logic.inline_transmission(None))
    assert type(first) is WaitForBudget and first.amount == 2 * MIB and budget.used == MIB


def test_a_batched_device_holds_the_reads_of_every_batch_until_sent() -> None:
    budget = MemoryBudget(64 * MIB)
    logic = session(Batching(16 * MIB), share=budget.share())
    assert steps_for(logic, reads(1, 4096)) == [RECEIVE]
    assert steps_for(logic, request(Command.READ, 2, 0, 8192)) == [RECEIVE]  # not sent yet: both held
    assert budget.used == 4096 + 8192
    assert [c.cookie for c in sent(logic, {1: 4096, 2: 8192})] == [1, 2]
    assert budget.used == 0


def test_a_batched_device_sends_once_flush_at_bytes_are_queued_across_batches() -> None:
    """Replies not yet sent count together, batch after batch: the batch that brings them to FLUSH_AT exactly
    asks for a SEND."""
    logic = session(Batching(16 * MIB))
    half = FLUSH_AT // 2
    assert steps_for(logic, reads(1, half)) == [RECEIVE]
    assert steps_for(logic, request(Command.READ, 2, half, half)) == [SEND, RECEIVE]


@pytest.fixture
def remote() -> Iterator[Any]:
    """NbdDevice on an in-process server's 16 MiB memory export (it has call_batch)."""
    with serve_exports("threads", {"d": Export(MemoryDevice(16 * MIB))}) as base:
        device = NbdDevice(base.format("d"))
        try:
            assert hasattr(device, "call_batch")
            yield device
        finally:
            device.close()


def test_a_batched_device_holds_its_reads_memory_until_sent(remote: Any) -> None:
    budget = MemoryBudget(64 * MIB)
    logic = session(remote, share=budget.share())
    remote.pwrite(b"\x07" * 4096, 8192)
    steps_for(
        logic, request(Command.READ, 1, 8192, 4096) + request(Command.FLUSH, 2) + request(Command.READ, 3, 0, 512)
    )
    assert budget.used == 4096 + 512
    got = sent(logic, {1: 4096, 3: 512})
    assert [(c.cookie, c.error) for c in got] == [(1, 0), (2, 0), (3, 0)]
    assert got[0].data[:4096] == b"\x07" * 4096
    assert budget.used == 0


def test_a_batched_device_without_a_budget_and_past_flush_at(remote: Any) -> None:
    logic = session(remote)
    taken = steps_for(logic, reads(5))
    assert SEND in taken  # 5 MiB of replies: sent before the next receive
    assert [c.cookie for c in sent(logic, dict.fromkeys(range(1, 6), MIB))] == [1, 2, 3, 4, 5]


def test_a_batched_device_while_shutting_down_and_with_a_streamed_write(remote: Any) -> None:
    logic = session(remote)
    steps_for(logic, request(Command.WRITE, 7, 0, SIZE) + b"\x02" * 1000)  # begun before the shutdown
    logic.begin_shutdown()
    steps_for(logic, b"\x02" * (SIZE - 1000) + reads(2, 512, first=20))
    assert [(c.cookie, c.error) for c in sent(logic)] == [(7, 0), (20, Errno.ESHUTDOWN), (21, Errno.ESHUTDOWN)]
    check = bytearray(SIZE)
    remote.pread_into(memoryview(check), 0)
    assert check == b"\x02" * SIZE
