"""What a server driver is asked to do in transmission, as explicit steps, and the numbers that pace it.

A driver that carries requests out where it reads them runs ``ServerSessionLogic.inline_transmission``: a
generator of steps, each an object that says what to do before the logic goes on::

    steps = logic.inline_transmission(read_view)
    found = None
    while True:
        step = steps.send(found)
        found = None
        if step is RECEIVE_READY:              # without sending or waiting, receive what has arrived
            found = receive_ready(logic.in_place_buffers())     # a count, or None when nothing had
            continue
        send_queued()                          # every other step sends what is queued first (then sent())
        if step is RECEIVE:
            receive()                          # wait for the client's bytes, hand them to the logic
        elif step is FINISHED:
            break                              # everything owed was sent: the connection is over
        elif type(step) is WaitForBudget:
            share.take(step.amount)            # the work goes on once the budget grants that much
        # SEND: nothing more

``Work`` is what a session carries out, and ``streamed_part`` the one test of whether a piece of work is part of
a write whose payload is handed over as it arrives (those must be carried out in order, by the reading side).
"""

from __future__ import annotations

import enum
from typing import TypeGuard

from nbdproto.engine import (
    WORK_TYPES,
    Request,
    WritePayload,
    WriteRequest,
)

__all__ = [
    "Step",
    "SEND",
    "RECEIVE",
    "RECEIVE_READY",
    "FINISHED",
    "WaitForBudget",
    "Work",
    "WORK_TYPES",
    "streamed_part",
    "BatchEnd",
    "FLUSH_AT",
    "STREAM_WRITES_OVER",
    "READY_IN_A_ROW",
]


class Step:
    """A step of ``inline_transmission``; the kinds below say what the driver does."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SEND = Step("SEND")
"""Send what is queued (then ``sent()``), and go on."""

RECEIVE = Step("RECEIVE")
"""Send what is queued, then wait for the client's next bytes and hand them to the logic (``received``,
``received_into_payload`` or ``received_in_place``, by where they were received; ``wait_ran_out`` when the
wait allowed by ``next_wait`` ran out)."""

RECEIVE_READY = Step("RECEIVE_READY")
"""Asked while big writes stream in place: without sending and without waiting, receive what has arrived into
``in_place_buffers()``, and send the count back into the steps (None when nothing had). Replies go out at the
RECEIVE that follows when nothing had, or after READY_IN_A_ROW receives that found bytes: a client streaming
writes is answered a batch at a time instead of one send a write, no reply waits on a receive that waits, and
one that never stops sending still gets its replies."""

FINISHED = Step("FINISHED")
"""Send what is queued: the connection is over (everything owed has been answered)."""


class WaitForBudget(Step):
    """Send what is queued, then wait until the connection's budget share grants ``amount`` bytes (the driver
    takes them: the work goes on with them)."""

    __slots__ = ("amount",)

    def __init__(self, amount: int) -> None:
        super().__init__("WAIT_FOR_BUDGET")
        self.amount = amount

    def __repr__(self) -> str:
        return f"WaitForBudget({self.amount})"


FLUSH_AT = 4 * 1024 * 1024
"""Reply bytes queued after which a driver sends before carrying out more: replies are made only as fast as
they can be sent, so a client that does not read its replies holds at most this much of them (plus one)."""

STREAM_WRITES_OVER = 1024 * 1024
"""Writes with a larger payload are carried out part by part as the payload arrives, instead of waiting for all
of it: a client that sends 32 MiB minus one byte then stalls holds one received chunk, not 32 MiB."""

READY_IN_A_ROW = 64
"""RECEIVE_READY steps that found bytes after which the replies queued are sent anyway (each brings at most one
write's payload and the next header, so at most this many writes' replies wait; nbdcopy keeps 64 requests in
flight on a connection, so it stops to wait for them first)."""

Work = Request | WritePayload
"""What a session carries out: a request, or a part of a streamed write's payload."""

"""The event types that are work (DisconnectRequest is not: the engine answers nothing to it)."""


def streamed_part(work: Work) -> TypeGuard[WriteRequest | WritePayload]:
    """Whether ``work`` is part of a write whose payload is handed over as it arrives (WriteRequest.more, then
    WritePayload): such parts are carried out in order, by the side that reads them (``carry_out_part``)."""
    kind = type(work)
    return kind is WritePayload or (kind is WriteRequest and work.more)  # type: ignore[union-attr]


class BatchEnd(enum.Enum):
    """Why ``next_batch`` stopped taking requests."""

    NEED_DATA = "send what is queued, then receive more"
    PAUSED = "replies are owed first (NBD_CMD_DISC, or a request reusing a cookie in flight): let them finish"
    CLOSED = "the client is gone: let in-flight requests finish, flush the device, close"
