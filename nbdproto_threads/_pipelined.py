"""Pipelined transmission in the blocking server, for devices that take requests without waiting for them
(``submit``: a remote export, NbdDevice): the connection's thread reads requests and starts them, many in flight,
and the replies go out as the device reports them (nbdproto.serving.Pipeline), in any order.

Who sends the replies: the thread that made them ready (a device's reader thread, which wakes the pipeline
after each burst of results) sends them at once, with one ``sendmsg`` that does not wait, when nothing else is
being sent (nbdproto.serving.ReplyOutbox, which the event-loop server uses too); whatever would have to wait (a
client slow to read, TLS, a send in progress, a burst over SEND_NOW_AT_MOST) goes to the connection's sender
thread, which sends in order and waits. So the device's threads never block on a client, and in the common case
no other thread is woken to answer it. Replies hold their budget until they are sent.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from nbdproto.serving import (
    BatchEnd,
    CarryOutPart,
    Chunk,
    ReplyOutbox,
    RequestBudget,
    StartRequests,
    WaitForRoom,
    Work,
    held_by,
    pieces_of,
)
from nbdproto.sockets import SharedTls, send_without_waiting

if TYPE_CHECKING:
    from ._session import ServerSession

__all__ = ["pipelined_transmission"]


class _Replies:
    """Sends one pipelined connection's replies (see the module docstring: nbdproto.serving.ReplyOutbox does the
    sending where it needs no wait); the engine is touched under ``lock``, which also guards the budget."""

    def __init__(self, session: ServerSession, budget: RequestBudget, tls: SharedTls | None) -> None:
        self._session = session
        self._lock = session._lock
        self._budget = budget
        self._tls = tls
        send_now = None if tls is not None else functools.partial(send_without_waiting, session.stream.sock)
        self.outbox = ReplyOutbox(session.engine, self._lock, send_now=send_now, queued=self._wake, sent=self._finished)
        self.room = threading.Condition(self._lock)  # the budget changed: the reader may go on
        self.waiting = 0  # the reader waits on ``room`` (under the lock): notified only then
        self._ready = threading.Condition(self._lock)  # the outbox has a chunk for the sender thread
        self._sender = threading.Thread(target=self._send_queued, name="nbd-replies", daemon=True)
        self._sender.start()

    def _wake(self) -> None:
        self._ready.notify()

    def _send_queued(self) -> None:
        """The sender thread: send the outbox's chunks in order, waiting as long as the client makes it. It
        takes every chunk queued at once and sends them together: while it sends, the device's threads queue
        the next bursts behind it, so a busy connection costs one send and one wake per round, not per burst."""
        session, tls, outbox = self._session, self._tls, self.outbox
        while True:
            with self._lock:
                while (chunks := outbox.take()) is None:
                    if outbox.stopped and not outbox.waiting:
                        return
                    self._ready.wait()
            failed = outbox.broken
            try:
                if not failed:
                    pieces = pieces_of(chunks)
                    if tls is None:
                        session.stream.send(pieces)
                    else:
                        tls.send(pieces)
            except OSError:
                failed = True
            finally:
                outbox.done(chunks, failed)

    def _finished(self, chunks: list[Chunk]) -> None:
        """The chunks' replies are out (or never will be): their budget is free again, and their reads' buffers
        are kept for reads to come."""
        replies, cost = held_by(chunks)
        if not replies:
            return  # (the session's own replies: they hold no budget)
        with self._lock:
            self._budget.done(cost, len(replies))
            self._session._share.give(cost)  # first: the buffers kept next are held from the share
            if not self.outbox.stopped:  # (once stopped, the session gives its budget back: keep nothing)
                self._session.logic.pipeline_sent(replies, self._budget.bytes)  # (``reclaim`` cuts back)
            if self.waiting:
                self.room.notify_all()

    def reclaim(self) -> None:
        """When a connection is about to wait for memory (WaitingShare.settle_with, from its thread, with the
        budget's lock held): if nothing is in flight here, let go of the reply buffers kept beyond their bound
        (ServerSessionLogic's ``pipeline_idle``). Only if this connection's lock is free: its own threads take
        the budget's lock while they hold it, so waiting for it here could wait for ever (a connection that
        holds it for a moment is asked again: a waiting connection settles again every half second)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._budget.idle and not self.outbox.stopped:
                self._session.logic.pipeline_idle()
        finally:
            self._lock.release()

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
        self.outbox.stop()  # (which wakes the sender thread)
        self._sender.join()


def pipelined_transmission(session: ServerSession) -> None:
    """Serve the connection's requests through its device's ``submit`` until the client is done."""
    logic, lock, engine, share = session.logic, session._lock, session.engine, session._share
    limits = logic.settings.limits
    budget = RequestBudget(limits.max_requests, limits.memory_limit)
    tls = None if session._plain else SharedTls(session.stream.sock)  # type: ignore[arg-type]
    replies = _Replies(session, budget, tls)
    share.settle_with(replies.reclaim)
    flush = replies.outbox.flush
    pipeline = logic.pipeline(flush)
    assert pipeline is not None, "pipelined transmission needs a device with submit()"
    replies.outbox.pipeline = pipeline
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
                    flush()
                    with lock:
                        replies.wait_until(lambda: not budget.full)
                    share.take(step.cost, session._stopping)
                else:  # the parts of a streamed write are carried out in order, here
                    reply = logic.carry_out_part(cast(CarryOutPart, step).part)
                    if reply is not None:
                        with lock:
                            engine.send(reply)
            batch.clear()
            flush()
            if end is not BatchEnd.NEED_DATA:
                with lock:  # ending, or DISC with replies owed: first let what is in flight finish
                    replies.wait_until(lambda: budget.idle)
                flush()
                if end is BatchEnd.CLOSED:
                    return
                continue
            if tls is None:
                session._receive(lock)
            else:
                session._receive_shared(tls, lock)
    finally:
        share.settle_with(None)
        pipeline.close()
        replies.stop()
        if tls is not None:
            with contextlib.suppress(OSError):
                tls.release()
