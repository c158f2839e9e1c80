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
