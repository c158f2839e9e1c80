"""The admission of a batch of requests to a pipeline, without I/O (ServerSessionLogic.pipelined_batch): both
backends' pipelined drivers do what its steps say, so the rules live here: requests start in order, collected
while the budgets allow; the ones collected start before any wait; a full request budget or a short memory share
is waited out; shutting down refuses; the parts of a streamed write are carried out in order."""

from __future__ import annotations

from typing import Any

import nbdproto
from nbdproto import Command
from nbdproto.devices import MemoryDevice
from nbdproto.serving import (
    KEPT_REPLY_BYTES,
    STREAM_WRITES_OVER,
    CarryOutPart,
    MemoryBudget,
    RequestBudget,
    StartRequests,
    WaitForRoom,
)
from tests.nbdbytes import replies, request
from tests.test_session_carry_out import session

MIB = 1 << 20
KIB = 1 << 10


def batch_of(logic: Any, received: bytes) -> list[Any]:
    logic.received(received)
    batch: list[Any] = []
    logic.next_batch(batch)
    return batch


def described(steps: Any) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for step in steps:
        if type(step) is StartRequests:
            out.append(("start", [r.cookie for r in step.requests], step.costs))
        elif type(step) is WaitForRoom:
            out.append(("wait", step.cost))
        else:
            assert type(step) is CarryOutPart
            out.append(("part", step.part.cookie))
    return out


def reads(*cookies: int, length: int = 4 * KIB) -> bytes:
    return b"".join(request(Command.READ, c, c * length, length) for c in cookies)


def test_a_batch_within_the_budgets_starts_at_once_in_order() -> None:
    logic = session(MemoryDevice(MIB))
    budget, share = RequestBudget(16, MIB), MemoryBudget(MIB).share()
    steps = described(logic.pipelined_batch(batch_of(logic, reads(1, 2, 3)), budget, share))
    assert steps == [("start", [1, 2, 3], [4 * KIB] * 3)]
    assert (budget.requests, budget.bytes) == (3, 12 * KIB)


def test_a_full_request_budget_starts_what_is_collected_then_waits_for_room() -> None:
    logic = session(MemoryDevice(MIB))
    budget, share = RequestBudget(2, MIB), MemoryBudget(MIB).share()
    steps = logic.pipelined_batch(batch_of(logic, reads(1, 2, 3, 4)), budget, share)
    assert described([next(steps)]) == [("start", [1, 2], [4 * KIB] * 2)]
    assert described([next(steps)]) == [("wait", 4 * KIB)]
    budget.done(8 * KIB, 2)  # the driver waited: the first two were answered
    assert share.try_take(4 * KIB)  # and took the request's cost from the share
    assert described(steps) == [("start", [3, 4], [4 * KIB] * 2)]
    assert (budget.requests, budget.bytes) == (2, 8 * KIB)


def test_a_short_memory_share_is_waited_for_with_the_cost_of_the_request() -> None:
    logic = session(MemoryDevice(MIB))
    budget, share = RequestBudget(16, MIB), MemoryBudget(6 * KIB).share()
    steps = logic.pipelined_batch(batch_of(logic, reads(1, 2)), budget, share)
    assert described([next(steps), next(steps)]) == [("start", [1], [4 * KIB]), ("wait", 4 * KIB)]
    share.give(4 * KIB)
    assert share.try_take(4 * KIB)  # what the driver's wait does
    assert described(steps) == [("start", [2], [4 * KIB])]


def test_shutting_down_refuses_the_requests_of_the_batch() -> None:
    logic = session(MemoryDevice(MIB))
    batch = batch_of(logic, reads(1, 2))
    logic.begin_shutdown()
    steps = described(logic.pipelined_batch(batch, RequestBudget(16, MIB), MemoryBudget(MIB).share()))
    assert steps == []
    answered = replies(b"".join(bytes(p) for p in logic.engine.data_to_send()))
    assert [(c.cookie, int(c.error)) for c in answered] == [
        (1, nbdproto.Errno.ESHUTDOWN),
        (2, nbdproto.Errno.ESHUTDOWN),
    ]


def test_the_parts_of_a_streamed_write_are_carried_out_in_order_between_the_requests() -> None:
    logic = session(MemoryDevice(4 * STREAM_WRITES_OVER))
    size = 2 * STREAM_WRITES_OVER
    header = request(Command.WRITE, 7, 0, size)
    batch = batch_of(logic, reads(1) + header + bytes(STREAM_WRITES_OVER))
    steps = described(logic.pipelined_batch(batch, RequestBudget(16, 8 * MIB), MemoryBudget(8 * MIB).share()))
    # The part is written as it comes (by the reading side, in order); the read collected before it starts after.
    assert steps == [("part", 7), ("start", [1], [4 * KIB])]


def test_requests_after_the_last_part_of_a_streamed_write_are_admitted_after_it() -> None:
    logic = session(MemoryDevice(4 * STREAM_WRITES_OVER))
    size = 2 * STREAM_WRITES_OVER
    first = batch_of(logic, request(Command.WRITE, 7, 0, size) + bytes(STREAM_WRITES_OVER))
    budget, share = RequestBudget(16, 8 * MIB), MemoryBudget(8 * MIB).share()
    assert described(logic.pipelined_batch(first, budget, share)) == [("part", 7)]
    rest = batch_of(logic, bytes(size - STREAM_WRITES_OVER) + reads(1, 2))
    assert described(logic.pipelined_batch(rest, budget, share)) == [
        ("part", 7),
        ("start", [1, 2], [4 * KIB] * 2),
    ]


def carry_out_calls(device: Any, calls: Any, tokens: Any, completions: Any) -> None:
    """What a device's ``submit`` does, at once: each call carried out on ``device``, its result (or the exception
    it raised) completed, then the burst."""
    for call, token in zip(calls, tokens, strict=True):
        try:
            result = getattr(device, call.method)(*call.args, **call.kwargs)
        except Exception as exc:
            result = exc
        completions.complete(token, result)
    completions.completed()


class _Submitting(MemoryDevice):
    """A memory device that takes calls as a remote one does (``submit``), carrying each out at once."""

    def submit(self, calls: Any, tokens: Any, completions: Any) -> None:
        carry_out_calls(self, calls, tokens, completions)


def _answered(logic: Any, pipeline: Any, received: bytes, budget: Any, share: Any) -> list[Any]:
    """Admit and start the requests of ``received``, then take their replies as a driver does once woken."""
    for step in logic.pipelined_batch(batch_of(logic, received), budget, share):
        assert type(step) is StartRequests
        pipeline.start(step.requests, step.costs)
    replies, cost = pipeline.replies()
    for reply in replies:
        logic.engine.send(reply)
    logic.engine.data_to_send()
    budget.done(cost, len(replies))
    share.give(cost)
    return replies


def test_the_buffers_of_reads_sent_are_filled_again_and_held_from_the_share() -> None:
    """A read's buffer, once its reply is sent (``pipeline_sent``), is kept and filled by a later read of its
    size, with that read's data; while kept it holds its bytes of the connection's memory share."""
    device = _Submitting(MIB)
    device.pwrite(bytes(range(256)) * 16, 4 * KIB)
    share = MemoryBudget(MIB).share()
    logic = session(device, share=share)
    pipeline = logic.pipeline(lambda: None)
    budget = RequestBudget(16, MIB)
    (first,) = _answered(logic, pipeline, reads(0), budget, share)
    buffer = first.data.obj
    assert bytes(first.data) == bytes(4 * KIB) and share.held == 0
    logic.pipeline_sent([first], budget.bytes)
    assert share.held == 4 * KIB  # kept
    (second,) = _answered(logic, pipeline, reads(1), budget, share)
    assert second.data.obj is buffer and bytes(second.data) == bytes(range(256)) * 16
    assert share.held == 0  # the read held its own while in flight, and gave it back with its reply
    (other,) = _answered(logic, pipeline, reads(2, length=8 * KIB), budget, share)
    assert other.data.obj is not buffer  # another size: a buffer of its own


def test_kept_buffers_give_their_share_back_before_a_read_would_wait() -> None:
    """A share spent on kept buffers does not make a read wait: they are let go first."""
    device = _Submitting(MIB)
    share = MemoryBudget(MIB + 8 * KIB).share()  # (a share may hold the whole budget while it is the only one)
    logic = session(device, share=share)
    pipeline = logic.pipeline(lambda: None)
    budget = RequestBudget(16, MIB)
    sent = _answered(logic, pipeline, reads(*range(4), length=256 * KIB), budget, share)
    logic.pipeline_sent(sent, budget.bytes)
    assert share.held == MIB
    steps = described(logic.pipelined_batch(batch_of(logic, reads(1, length=512 * KIB)), budget, share))
    assert steps == [("start", [1], [512 * KIB])]  # no wait: the kept MiB went back
    assert share.held == 512 * KIB


def test_closing_gives_back_the_kept_buffers_once_and_keeps_nothing_after() -> None:
    """The end of a connection gives back exactly what it held, kept buffers included (given twice, the
    server's budget would count less than is in use); replies sent after it keep nothing."""
    budget = MemoryBudget(4 * MIB)
    share = budget.share()
    logic = session(_Submitting(MIB), share=share)
    pipeline = logic.pipeline(lambda: None)
    requests = RequestBudget(16, MIB)
    sent = _answered(logic, pipeline, reads(0, 1), requests, share)
    logic.pipeline_sent(sent[:1], 4 * KIB)  # (the second still in flight)
    assert share.held == 4 * KIB
    logic.close()
    assert (share.held, budget.used, budget.holders) == (0, 0, 0)
    logic.pipeline_sent(sent[1:], 0)  # a driver's thread that sent late
    assert (share.held, budget.used, budget.holders) == (0, 0, 0)


def test_a_read_takes_a_kept_buffer_with_the_share_it_holds() -> None:
    """A read of a kept buffer's size takes the buffer and the memory it holds, as its cost: the share holds
    the same before and after admitting it, and the same read budget rules hold (a full request budget waits,
    shutting down refuses)."""
    share = MemoryBudget(MIB).share()
    logic = session(_Submitting(MIB), share=share)
    pipeline = logic.pipeline(lambda: None)
    budget = RequestBudget(2, MIB)
    logic.pipeline_sent(_answered(logic, pipeline, reads(0, 1), budget, share), budget.bytes)
    assert share.held == 8 * KIB  # two buffers kept
    steps = logic.pipelined_batch(batch_of(logic, reads(2, 3, 4)), budget, share)
    assert described([next(steps)]) == [("start", [2, 3], [4 * KIB] * 2)]
    assert share.held == 8 * KIB and logic._reply_buffers.kept == 0  # the reads hold the buffers' share now
    assert described([next(steps)]) == [("wait", 4 * KIB)]  # two requests in flight: full
    budget.done(8 * KIB, 2)
    share.give(8 * KIB)
    assert share.try_take(4 * KIB)
    assert described(steps) == [("start", [4], [4 * KIB])]
    logic.pipeline_sent(_answered(logic, pipeline, reads(5), RequestBudget(2, MIB), share), 0)
    batch = batch_of(logic, reads(6))
    logic.begin_shutdown()
    assert described(logic.pipelined_batch(batch, budget, share)) == []
    answered = replies(b"".join(bytes(p) for p in logic.engine.data_to_send()))
    assert [(c.cookie, int(c.error)) for c in answered] == [(6, nbdproto.Errno.ESHUTDOWN)]


def _admitted(logic: Any, pipeline: Any, received: bytes, budget: Any, share: Any) -> list[Any]:
    """Admit and start the requests of ``received`` (all within the budgets); their replies, made, not sent."""
    for step in logic.pipelined_batch(batch_of(logic, received), budget, share):
        assert type(step) is StartRequests
        pipeline.start(step.requests, step.costs)
    made, _ = pipeline.replies()
    return made


def _sent(logic: Any, made: list[Any], budget: Any, share: Any) -> None:
    """Send ``made`` as a driver does: their budget back, then ``pipeline_sent`` with what is still in flight."""
    for reply in made:
        logic.engine.send(reply)
    logic.engine.data_to_send()
    cost = sum(len(reply.data) for reply in made)
    budget.done(cost, len(made))
    share.give(cost)
    logic.pipeline_sent(made, budget.bytes)


def _nbdcopy_reads(depth: int = 64, length: int = 256 * KIB) -> tuple[Any, Any, Any, Any, list[Any]]:
    """A pipelined session with nbdcopy's reads in flight (``depth`` of ``length`` bytes), their replies made:
    the session, its pipeline, request budget and memory share, and the replies."""
    share = MemoryBudget(512 * MIB).share()
    logic = session(_Submitting(64 * MIB), share=share)
    pipeline = logic.pipeline(lambda: None)
    budget = RequestBudget(depth, 64 * MIB)
    made = _admitted(logic, pipeline, reads(*range(depth), length=length), budget, share)
    return logic, pipeline, budget, share, made


def test_a_busy_connection_keeps_the_buffers_of_all_it_has_in_flight_and_cuts_back_when_told() -> None:
    """nbdcopy's reads: 64 of 256 KiB in flight on a connection (16 MiB, more than KEPT_REPLY_BYTES). Replies
    sent while the rest are in flight keep their buffers, as many as the connection had in flight at most less
    what is in flight now, so the reads that follow them get the very buffers again, none made anew; the
    connection never holds more than at its busiest; once nothing is in flight and the driver says so
    (``pipeline_idle``), what is kept is cut back to KEPT_REPLY_BYTES and the rest of the share given back."""
    length, depth = 256 * KIB, 64
    logic, pipeline, budget, share, made = _nbdcopy_reads(depth, length)
    peak = depth * length
    assert share.held == peak
    for round_ in range(1, 4):  # a half is answered, and the client asks as much again
        sent, made = made[: depth // 2], made[depth // 2 :]
        _sent(logic, sent, budget, share)
        assert logic._reply_buffers.kept == len(sent) * length > KEPT_REPLY_BYTES  # all of them kept
        assert share.held == peak  # in flight and kept: no more than at the busiest
        cookies = range(round_ * depth, round_ * depth + depth // 2)
        again = _admitted(logic, pipeline, reads(*cookies, length=length), budget, share)
        assert [reply.data.obj for reply in again] == [reply.data.obj for reply in reversed(sent)]  # none anew
        assert logic._reply_buffers.kept == 0 and share.held == peak
        made += again
    _sent(logic, made[: depth // 2], budget, share)  # a half answered, and the client asks for other sizes
    assert logic._reply_buffers.kept == depth // 2 * length
    other = _admitted(logic, pipeline, reads(*range(4 * depth, 4 * depth + 16), length=length // 2), budget, share)
    _sent(logic, made[depth // 2 :], budget, share)  # kept only as far as the busiest, less what is in flight
    assert logic._reply_buffers.kept + budget.bytes == peak
    _sent(logic, other, budget, share)  # the last replies: nothing in flight any more
    logic.pipeline_idle()
    assert logic._reply_buffers.kept == share.held <= KEPT_REPLY_BYTES
    assert share.held > KEPT_REPLY_BYTES - length  # cut back to the bound, not to nothing


def test_a_connection_with_little_in_flight_keeps_no_more_than_the_bound() -> None:
    """A connection that never had more than KEPT_REPLY_BYTES in flight keeps what it did before: at most the
    bound, however many replies it sends while others are in flight."""
    length = 256 * KIB
    share = MemoryBudget(512 * MIB).share()
    logic = session(_Submitting(64 * MIB), share=share)
    pipeline = logic.pipeline(lambda: None)
    budget = RequestBudget(64, 64 * MIB)
    depth = KEPT_REPLY_BYTES // length - 2
    for round_ in range(4):
        made = _admitted(
            logic, pipeline, reads(*range(round_ * depth, (round_ + 1) * depth), length=length), budget, share
        )
        _sent(logic, made[:-1], budget, share)  # one left in flight
        assert logic._reply_buffers.kept + budget.bytes <= KEPT_REPLY_BYTES
        _sent(logic, made[-1:], budget, share)
        assert logic._reply_buffers.kept <= KEPT_REPLY_BYTES


def test_nothing_is_cut_back_when_nothing_is_in_flight_until_the_driver_says_so() -> None:
    """With nothing in flight the buffers of the last replies are kept as a busy connection's (the servers'
    connections go idle between a client's rounds, and the next round wants them); ``pipeline_idle`` (when
    another connection would wait for the memory) cuts back to KEPT_REPLY_BYTES."""
    length, depth = 256 * KIB, 64
    logic, _, budget, share, made = _nbdcopy_reads(depth, length)
    _sent(logic, made, budget, share)
    assert logic._reply_buffers.kept == share.held == depth * length  # all of them, for the next round
    logic.pipeline_idle()
    assert KEPT_REPLY_BYTES - length < logic._reply_buffers.kept == share.held <= KEPT_REPLY_BYTES
