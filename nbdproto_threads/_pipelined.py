"""Pipelined transmission in the blocking server, for devices that take requests without waiting for them
(``submit``: a remote export, NbdDevice): the connection's thread reads requests and starts them, many in flight,
and the replies go out as the device reports them (nbdproto.serving.Pipeline), in any order.

Who sends the replies: the thread that made them ready (a device's reader thread, which wakes the pipeline
after each burst of results) sends them at once, with one ``sendmsg`` that does not wait, when nothing else is
being sent; whatever would have to wait (a client slow to read, TLS, a send in progress) goes to the
connection's sender thread, which sends in order and waits. So the device's threads never block on a client,
and in the common case no other thread is woken to answer it. Replies hold their budget until they are sent.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from nbdproto.engine import Event
from nbdproto.serving import BatchEnd, CarryOutPart, Pipeline, RequestBudget, StartRequests, WaitForRoom, Work
from nbdproto.sockets import SharedTls, send_without_waiting

if TYPE_CHECKING:
    from ._session import ServerSession

__all__ = ["pipelined_transmission"]


class _Replies:
    """Sends one pipelined connection's replies (see the module docstring); the engine is touched under
    ``lock``, which also guards the outbox and the budget."""

    def __init__(self, session: ServerSession, budget: RequestBudget, tls: SharedTls | None) -> None:
        self._session = session
        self._lock = session._lock
        self._engine = session.engine
        self._budget = budget
        self._tls = tls
        self.pipeline: Pipeline | None = None
        self.room = threading.Condition(self._lock)  # the budget changed: the reader may go on
        self.waiting = 0  # the reader waits on ``room`` (under the lock): notified only then
        self._ready = threading.Condition(self._lock)  # the outbox has a chunk for the sender thread
        self._outbox: deque[list[Any]] = deque()  # [pieces, replies, cost], in order
        self._sending = False  # a thread is sending: the others queue
        self._stopped = False
        self._broken = False  # a send failed: the client is gone, nothing more is sent
        self._sender = threading.Thread(target=self._send_queued, name="nbd-replies", daemon=True)
        self._sender.start()

    def flush(self) -> None:
        """Queue every reply ready (the pipeline's and the session's own) and send them: here and now if that
        needs no wait, else by the sender thread. Any thread may call it."""
        with self._lock:
            if self._stopped:
                return  # (results that came after the end: the connection's budget went back as it closed)
            pipeline, cost = self.pipeline, 0
            replies: list[Event] = []
            if pipeline is not None:
                replies, cost = pipeline.replies()
                for reply in replies:
                    self._engine.send(reply)
            pieces = self._engine.data_to_send()
            if not pieces and not replies:
                return
            chunk: list[Any] = [pieces, replies, cost]
            if self._sending or self._outbox or self._tls is not None or self._broken:
                self._outbox.append(chunk)
                self._ready.notify()
                return
            self._sending = True
        try:
            rest = send_without_waiting(self._session.stream.sock, chunk[0])
        except OSError:
            rest, self._broken = None, True  # (the reading side notices the client went away)
        with self._lock:
            self._sending = False
            if rest is not None:
                chunk[0] = rest
                self._outbox.appendleft(chunk)  # before anything queued meanwhile
            if self._outbox:  # the rest, or what other threads queued while this one sent: the sender's now
                self._ready.notify()
            if rest is not None:
                return
        self._finished([chunk])

    def _send_queued(self) -> None:
        """The sender thread: send the outbox's chunks in order, waiting as long as the client makes it. It
        takes every chunk queued at once and sends them together: while it sends, the device's threads queue
        the next bursts behind it, so a busy connection costs one send and one wake per round, not per burst."""
        session, tls = self._session, self._tls
        while True:
            with self._lock:
                while (self._sending or not self._outbox) and not self._stopped:
                    self._ready.wait()
                if not self._outbox:
                    return
                chunks = list(self._outbox)
                self._outbox.clear()
                self._sending = True
            pieces = chunks[0][0] if len(chunks) == 1 else [piece for chunk in chunks for piece in chunk[0]]
            try:
                if not self._broken:
                    if tls is None:
                        session.stream.send(pieces)
                    else:
                        tls.send(pieces)
            except OSError:
                self._broken = True
            finally:
                with self._lock:
                    self._sending = False
                    self._ready.notify()
            self._finished(chunks)

    def _finished(self, chunks: list[list[Any]]) -> None:
        """The chunks' replies are out (or never will be): their budget is free again, and their reads' buffers
        are kept for reads to come."""
        replies = [reply for chunk in chunks for reply in chunk[1]]
        if not replies:
            return  # (the session's own replies: they hold no budget)
        cost = sum(chunk[2] for chunk in chunks)
        with self._lock:
            self._budget.done(cost, len(replies))
            self._session._share.give(cost)  # first: the buffers kept next are held from the share
            if not self._stopped:  # (once stopped, the session gives its budget back: keep nothing)
                self._session.logic.pipeline_sent(replies)
            if self.waiting:
                self.room.notify_all()

    def wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait, with the lock held, until ``ready()`` (the budget changes as replies are sent)."""
        while not ready():
            self.waiting += 1
            try:
                self.room.wait()
            finally:
                self.waiting -= 1

    def stop(self) -> None:
        """No more replies: the sender thread ends once the outbox is empty."""
        with self._lock:
            self._stopped = True
            self._ready.notify_all()
        self._sender.join()


def pipelined_transmission(session: ServerSession) -> None:
    """Serve the connection's requests through its device's ``submit`` until the client is done."""
    logic, lock, engine, share = session.logic, session._lock, session.engine, session._share
    limits = logic.settings.limits
    budget = RequestBudget(limits.max_requests, limits.memory_limit)
    tls = None if session._plain else SharedTls(session.stream.sock)  # type: ignore[arg-type]
    replies = _Replies(session, budget, tls)
    pipeline = logic.pipeline(replies.flush)
    assert pipeline is not None, "pipelined transmission needs a device with submit()"
    replies.pipeline = pipeline
    batch: list[Work] = []
    try:
        while True:
            with lock:
                end = logic.next_batch(batch)
            steps = logic.pipelined_batch(batch, budget, share)
            while True:
                with lock:  # the steps touch the engine and the budget, which the replies' threads share
                    step = next(steps, None)
                if step is None:
                    break
                if type(step) is StartRequests:
                    pipeline.start(step.requests, step.costs)
                elif type(step) is WaitForRoom:
                    replies.flush()
                    with lock:
                        replies.wait_until(lambda: not budget.full)
                    share.take(step.cost, session._stopping)
                else:  # the parts of a streamed write are carried out in order, here
                    reply = logic.carry_out_part(cast(CarryOutPart, step).part)
                    if reply is not None:
                        with lock:
                            engine.send(reply)
            batch.clear()
            replies.flush()
            if end is not BatchEnd.NEED_DATA:
                with lock:  # ending, or DISC with replies owed: first let what is in flight finish
                    replies.wait_until(lambda: budget.idle)
                replies.flush()
                if end is BatchEnd.CLOSED:
                    return
                continue
            if tls is None:
                session._receive(lock)
            else:
                session._receive_shared(tls, lock)
    finally:
        pipeline.close()
        replies.stop()
        if tls is not None:
            with contextlib.suppress(OSError):
                tls.release()
