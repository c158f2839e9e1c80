"""Pipelined transmission in the async server, for devices that take requests without waiting for them
(``submit``: a remote export, NbdDevice): the connection's task reads requests and starts them on the device,
many in flight, and they are answered as the device reports them (nbdproto.serving.Pipeline), in any order,
each burst with one send.

Starting requests may block (sending upstream, reconnecting within the device's limits), so the loop starts a
batch itself only where the device takes it without waiting (``submit_nowait``: most often, a connection
upstream with room to send); otherwise, or for what such a send left over, a starter thread does, which keeps
the batches in the order they were read.

Replies leave from the device's thread that completed them, with one send that does not wait, when the socket
takes them (nbdproto.serving.ReplyOutbox): waking the loop for every burst made a proxy's requests wait for a
wake-up and a hand-over of the interpreter lock, 0.74-0.91x nbdkit's nbd plugin where the threads server, which
answered so, reached 1.14x (bench/bench_proxy.sh). The loop then touches the engine under the outbox's lock,
as those threads do. What cannot go at once (a client slow to read, a burst larger than SEND_NOW_AT_MOST, a TLS
connection, whose TLS object is the loop's alone) the answering task sends, woken by a byte on a socket pair (a
wake that needs no trip through the loop's own scheduling, on asyncio and trio alike). The budgets stay the
loop's: replies other threads sent give theirs back when the loop next looks at them (``_Replies.settle``),
and those threads wake it for that only while it waits for the budget, or another connection for memory. The
same wait has an idle connection let go of the read buffers it kept beyond their bound (``_Replies.reclaim``):
cut back whenever nothing was in flight, they were let go between every two rounds of nbdcopy's requests.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import anyio
import anyio.to_thread

from nbdproto.engine import Request
from nbdproto.serving import (
    BatchEnd,
    CarryOutPart,
    Chunk,
    Pipeline,
    ReplyOutbox,
    StartRequests,
    WaitForRoom,
    Work,
    held_by,
    pieces_of,
)
from nbdproto.sockets import send_without_waiting

from ._readable import Readable
from ._socket import RawSocketStream, send_pieces

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


class _Replies:
    """One pipelined connection's replies (module docstring): a ReplyOutbox, whose sender is the answering
    task, and the budgets given back on the loop (``settle``) for replies other threads sent."""

    def __init__(self, session: ServerSession, budget: WaitingRequests, wake: _Wake) -> None:
        self._session = session
        self._budget = budget
        self._wake = wake
        stream, send_now = session.stream, None
        if isinstance(stream, RawSocketStream):  # (a TLS object is the loop's alone)
            send_now = functools.partial(send_without_waiting, stream.sock)
        self.direct = send_now is not None
        self.outbox = ReplyOutbox(
            session.engine, threading.Lock(), send_now=send_now, queued=self._queued, sent=self._sent
        )
        self._loop_thread = threading.get_ident()
        self._unsettled: deque[Chunk] = deque()  # sent by other threads: their budget is the loop's to give back
        self._loop_waits = False  # the loop waits for the budget: replies sent elsewhere must wake it

    def _queued(self) -> None:
        # (on the loop, whoever queued sends next: ``send`` takes what its own flush queued, and the reading
        # task sends after every batch of steps, whose requests may complete on the loop)
        if threading.get_ident() != self._loop_thread:
            self._wake()

    def _sent(self, chunks: list[Chunk]) -> None:
        if threading.get_ident() == self._loop_thread:
            self._give_back(chunks)
            return
        with self.outbox.lock:
            self._unsettled.extend(chunks)
            wake = self._loop_waits or self._session._share.others_wait
        if wake:
            self._wake()

    def settle(self) -> None:
        """On the loop: give back the budget of the replies other threads sent (before the loop looks at it)."""
        if self._unsettled:
            with self.outbox.lock:
                chunks = list(self._unsettled)
                self._unsettled.clear()
            self._give_back(chunks)

    def _give_back(self, chunks: list[Chunk]) -> None:
        replies, cost = held_by(chunks)
        if not replies:
            return  # (the session's own replies: they hold no budget)
        self._budget.done(cost, len(replies))
        self._session._share.give(cost)  # first: the buffers kept next are held from the share
        if not self.outbox.stopped:  # (once stopped, the session gives its budget back: keep nothing)
            self._session.logic.pipeline_sent(replies, self._budget.budget.bytes)  # (``reclaim`` cuts back)

    def reclaim(self) -> None:
        """On the loop, when a connection is about to wait for memory (WaitingShare.settle_with): ``settle``, and
        if nothing is in flight, let go of the reply buffers kept beyond their bound (ServerSessionLogic's
        ``pipeline_idle``): an idle connection holds them only until the memory is wanted."""
        self.settle()
        if self._budget.budget.idle and not self.outbox.stopped:
            self._session.logic.pipeline_idle()

    async def wait(self, waiting: Awaitable[None]) -> None:
        """Await ``waiting`` (for the budget), with replies that other threads send meanwhile given back."""
        with self.outbox.lock:
            self._loop_waits = True
        try:
            self.settle()
            await waiting
        finally:
            self._loop_waits = False

    async def send(self) -> None:
        """Send what the engine has queued now, and what waits for the sender, waiting as the client makes it."""
        outbox = self.outbox
        outbox.flush()
        while True:
            with outbox.lock:
                chunks = outbox.take()
            if chunks is None:
                return
            failed = outbox.broken
            try:
                if not failed:
                    await send_pieces(self._session.stream, pieces_of(chunks))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                failed = True  # a dead connection is the reading side's to notice: it ends the session
            finally:
                outbox.done(chunks, failed)


async def _answer(replies: _Replies, wake: _Wake, starter: _Starter) -> None:
    """The answering task: sends what other threads could not send without waiting (and, where only the loop
    may send, every burst of results), and gives back the budget of what they sent."""
    while True:
        await wake.wait()
        if starter.failure is not None:
            raise starter.failure
        await replies.send()
        replies.settle()


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
    replies = _Replies(session, budget, wake)
    outbox, lock = replies.outbox, replies.outbox.lock
    pipeline = logic.pipeline(outbox.flush if replies.direct else wake)
    assert pipeline is not None, "pipelined transmission needs a device with submit()"
    outbox.pipeline = pipeline
    starter = _Starter(pipeline, wake)
    share.settle_with(replies.reclaim)
    batch: list[Work] = []
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_answer, replies, wake, starter)
            while True:
                replies.settle()
                with lock:
                    end = logic.next_batch(batch)
                steps = logic.pipelined_batch(batch, budget.budget, share)
                while True:
                    with lock:  # the steps touch the engine, which the threads that send replies share
                        step = next(steps, None)
                    if step is None:
                        break
                    if type(step) is StartRequests:
                        _start(pipeline, starter, step)
                    elif type(step) is WaitForRoom:
                        await replies.send()
                        await replies.wait(budget.wait_for_room())
                        await replies.wait(share.take(step.cost))
                    else:  # the parts of a streamed write are carried out in order, here
                        reply = await anyio.to_thread.run_sync(logic.carry_out_part, cast(CarryOutPart, step).part)
                        if reply is not None:
                            with lock:
                                engine.send(reply)
                batch.clear()
                await replies.send()
                if end is BatchEnd.NEED_DATA:
                    await session._receive(lock)
                    continue
                # DISC with replies owed, or the end: let what is in flight finish.
                await replies.wait(budget.wait_idle())
                await replies.send()
                if end is BatchEnd.CLOSED:
                    tasks.cancel_scope.cancel()
                    return
    finally:
        outbox.stop()
        share.settle_with(None)
        pipeline.close()
        starter.stop()
        wake.close()
