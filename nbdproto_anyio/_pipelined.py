"""Pipelined transmission in the async server, for devices that take requests without waiting for them
(``submit``: a remote export, NbdDevice): the connection's task reads requests and starts them on the device,
many in flight, and a second task answers them as the device reports them (nbdproto.serving.Pipeline), in any
order, each burst with one send.

Starting requests may block (sending upstream, reconnecting within the device's limits), so the loop starts a
batch itself only where the device takes it without waiting (``submit_nowait``: most often, a connection
upstream with room to send); otherwise, or for what such a send left over, a starter thread does, which keeps
the batches in the order they were read.

The device's threads report from outside the event loop: ``Pipeline`` wakes the loop at most once between two
looks at its results, by a byte on a socket pair the answering task waits on (a wake that needs no trip
through the loop's own scheduling, on asyncio and trio alike).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import anyio
import anyio.to_thread

from nbdproto.engine import Request
from nbdproto.serving import BatchEnd, CarryOutPart, Pipeline, StartRequests, WaitForRoom, Work

from ._readable import Readable

if TYPE_CHECKING:
    from ._budget import WaitingRequests
    from ._server import ServerSession

__all__ = ["pipelined_transmission"]


class _Wake:
    """Wakes the answering task from any thread: a byte on a socket pair (a full pair has a wake pending)."""

    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._ours.setblocking(False)
        self._theirs.setblocking(False)
        self._readable = Readable(self._ours)

    def __call__(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake is pending; closed: the connection is over
            self._theirs.send(b"\0")

    async def wait(self) -> None:
        await self._readable.wait()
        with contextlib.suppress(BlockingIOError):
            self._ours.recv(4096)

    def close(self) -> None:
        self._readable.close()
        self._theirs.close()
        self._ours.close()


class _Starter:
    """The thread that starts batches of requests on the pipeline when that may wait, in the order they were
    read (``start``), and finishes sends the loop began (``finish``). A failure (none is expected: the device
    hands failures to the results) is kept for the loop to raise."""

    def __init__(self, pipeline: Pipeline, wake: _Wake) -> None:
        self._pipeline = pipeline
        self._wake = wake
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._put = 0  # jobs put (counted by the loop alone) and done (by the thread alone): no count is lost
        self._done = 0
        self.failure: BaseException | None = None
        threading.Thread(target=self._run, name="nbd-submit", daemon=True).start()

    @property
    def idle(self) -> bool:
        """No batch is waiting or being started: one the loop starts now cannot overtake an earlier one."""
        return self._put == self._done

    def start(self, requests: list[Request], costs: list[int]) -> None:
        if requests:
            self.finish(functools.partial(self._pipeline.start, requests, costs))

    def finish(self, job: Callable[[], None]) -> None:
        self._put += 1
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # raised on the loop, which ends the connection
                self.failure = exc
                self._wake()
                return
            finally:
                self._done += 1


async def _answer(
    session: ServerSession, pipeline: Pipeline, budget: WaitingRequests, wake: _Wake, starter: _Starter
) -> None:
    """The answering task: every burst of results becomes replies, sent together, their budget given back."""
    engine, share = session.engine, session._share
    while True:
        await wake.wait()
        if starter.failure is not None:
            raise starter.failure
        replies, cost = pipeline.replies()
        if not replies:
            continue
        for reply in replies:
            engine.send(reply)
        try:
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await session._send()  # a dead connection is the reading side's to notice: it ends the session
        finally:
            budget.done(cost, len(replies))
            share.give(cost)
            session.logic.pipeline_sent(replies)  # the reads' buffers, kept for reads to come


def _start(pipeline: Pipeline, starter: _Starter, step: StartRequests) -> None:
    """Start the step's requests here, on the loop, where the device takes them without waiting (most often:
    a connection upstream with room to send), else on the starter thread."""
    if starter.idle:
        try:
            rest = pipeline.start_nowait(step.requests, step.costs)
        except BlockingIOError:
            pass
        else:
            if rest is not None:
                starter.finish(rest)
            return
    starter.start(step.requests, step.costs)


async def pipelined_transmission(session: ServerSession, budget: WaitingRequests) -> None:
    """Serve the connection's requests through its device's ``submit`` until the client is done."""
    logic, share, engine = session.logic, session._share, session.engine
    wake = _Wake()
    pipeline = logic.pipeline(wake)
    assert pipeline is not None, "pipelined transmission needs a device with submit()"
    starter = _Starter(pipeline, wake)
    session._shared_sending = True
    batch: list[Work] = []
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_answer, session, pipeline, budget, wake, starter)
            while True:
                end = logic.next_batch(batch)
                for step in logic.pipelined_batch(batch, budget.budget, share):
                    if type(step) is StartRequests:
                        _start(pipeline, starter, step)
                    elif type(step) is WaitForRoom:
                        await budget.wait_for_room()
                        await share.take(step.cost)
                    else:  # the parts of a streamed write are carried out in order, here
                        reply = await anyio.to_thread.run_sync(logic.carry_out_part, cast(CarryOutPart, step).part)
                        if reply is not None:
                            engine.send(reply)
                batch.clear()
                if end is BatchEnd.NEED_DATA:
                    await session._send()
                    await session._receive()
                    continue
                # DISC with replies owed, or the end: let what is in flight finish.
                await budget.wait_idle()
                await session._send()
                if end is BatchEnd.CLOSED:
                    tasks.cancel_scope.cancel()
                    return
    finally:
        pipeline.close()
        starter.stop()
        wake.close()
