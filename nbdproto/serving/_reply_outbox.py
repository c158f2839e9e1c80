"""ReplyOutbox: a pipelined connection's replies on their way to the client, sent by whichever thread made them.

A pipeline (nbdproto.serving.Pipeline) is woken by the device's threads when results come in. The quickest
answer is the waking thread's own: it makes the replies (under the connection's lock: the engine is not
thread-safe) and sends them with one system call that does not wait, when nothing else is being sent. Waking
another thread (or an event loop) for every burst costs a wake-up and a hand-over of the interpreter lock, and
the reply waits for both: a proxy's requests took a third longer on the event-loop server than on the threads
server, which answered so (bench/bench_proxy.sh). What cannot go at once (a client slow to read, a send in
progress, or a connection whose TLS object only its own sender may use) is queued, in order, for the
connection's sender (a thread, or an event loop's task), which may wait. Each burst holds its budget until it
is out: ``sent`` gets it back then.

No I/O here: the driver gives the send that does not wait, how to wake its sender, and what to do once replies
are out::

    outbox = ReplyOutbox(engine, lock, send_now=..., queued=wake_sender, sent=give_back)
    outbox.pipeline = logic.pipeline(outbox.flush)   # the device's threads answer as results come
    ... the sender, woken:  with lock: chunks = outbox.take()  ... send pieces_of(chunks) ... outbox.done(chunks)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ._pipeline import Pipeline

__all__ = ["ReplyOutbox", "Chunk", "pieces_of", "held_by", "SEND_NOW_AT_MOST"]

SEND_NOW_AT_MOST = 128 * 1024
"""Bytes of replies at most that the thread that made them sends itself; larger bursts (nbdcopy's 256 KiB reads)
go to the sender. They seldom fit in the socket at once, so the sender took over the rest anyway, after a send
and a wake more: a proxy's nbdcopy reads cost a tenth more CPU so (bench/bench_proxy.sh, event-loop server)."""

Chunk = list[Any]
"""A burst of replies on its way out: ``[pieces, replies, cost]``: what is left to send of it, its reply events
and the budget they hold."""


def pieces_of(chunks: list[Chunk]) -> list[Any]:
    """Every piece of ``chunks``, in order: what a sender sends with one call."""
    return chunks[0][0] if len(chunks) == 1 else [piece for chunk in chunks for piece in chunk[0]]


def held_by(chunks: list[Chunk]) -> tuple[list[Any], int]:
    """The replies of ``chunks`` and the budget they hold: what a driver gives back once they are out."""
    return [reply for chunk in chunks for reply in chunk[1]], sum(chunk[2] for chunk in chunks)


class ReplyOutbox:
    """One pipelined connection's replies (module docstring). ``lock`` guards the engine (the driver holds it
    wherever it touches the engine too) and everything here.

    - ``send_now(pieces)``: send what goes without waiting; None when all went, else what is left (OSError when
      the client is gone). None: only the sender sends (a TLS connection).
    - ``queued()``: something waits for the sender; called with the lock held.
    - ``sent(chunks)``: the chunks' replies are out, or never will be (the client is gone): give their budget
      back. Called from the thread that sent them, the lock not held."""

    __slots__ = (
        "lock", "pipeline", "broken", "stopped", "_engine", "_send_now", "_queued", "_sent", "_chunks", "_sending"
    )  # fmt: skip

    def __init__(
        self,
        engine: Any,
        lock: threading.Lock,
        *,
        send_now: Callable[[list[Any]], list[Any] | None] | None,
        queued: Callable[[], None],
        sent: Callable[[list[Chunk]], None],
    ) -> None:
        self.lock = lock
        self.pipeline: Pipeline | None = None
        self.broken = False  # a send failed: the client is gone, nothing more is sent
        self.stopped = False  # the connection is over: nothing more is made or sent
        self._engine = engine
        self._send_now = send_now
        self._queued = queued
        self._sent = sent
        self._chunks: deque[Chunk] = deque()  # for the sender, in order
        self._sending = False  # a thread is sending: the others queue

    def flush(self) -> None:
        """Make every reply ready (the pipeline's, and what else the engine has queued) and send them: here and
        now where that needs no wait, else queued for the sender. Any thread may call it, without the lock."""
        with self.lock:
            if self.stopped:
                return  # (results that came after the end: the connection's budget went back as it closed)
            pipeline, cost = self.pipeline, 0
            replies: list[Any] = []
            if pipeline is not None:
                replies, cost = pipeline.replies()
                send = self._engine.send
                for reply in replies:
                    send(reply)
            pieces = self._engine.data_to_send()
            if not pieces and not replies:
                return
            chunk: Chunk = [pieces, replies, cost]
            if (
                self._sending
                or self._chunks
                or self.broken
                or self._send_now is None
                or sum(map(len, pieces)) > SEND_NOW_AT_MOST
            ):
                self._chunks.append(chunk)
                self._queued()
                return
            self._sending = True
        try:
            rest = self._send_now(pieces)
        except OSError:
            rest, self.broken = None, True  # (the reading side notices that the client went away)
        with self.lock:
            self._sending = False
            if rest is not None:
                chunk[0] = rest
                self._chunks.appendleft(chunk)  # before anything queued meanwhile
            if self._chunks:  # the rest, or what other threads queued while this one sent: the sender's now
                self._queued()
            if rest is not None:
                return
        self._sent([chunk])

    def stop(self) -> None:
        """The connection is over: replies that still come are neither made nor sent (``queued()`` is called,
        for a sender that waits to hear it)."""
        with self.lock:
            self.stopped = True
            self._queued()

    @property
    def waiting(self) -> bool:
        """Whether chunks wait for the sender (read with the lock held)."""
        return bool(self._chunks)

    def take(self) -> list[Chunk] | None:
        """For the sender, with the lock held: every chunk queued, in order, now its own to send (then ``done``);
        None when none is queued or another thread is sending."""
        if self._sending or not self._chunks:
            return None
        chunks = list(self._chunks)
        self._chunks.clear()
        self._sending = True
        return chunks

    def done(self, chunks: list[Chunk], failed: bool) -> None:
        """The sender sent ``chunks`` (without the lock held); ``failed``: the client is gone, and nothing more
        is sent."""
        with self.lock:
            self._sending = False
            if failed:
                self.broken = True
            if self._chunks:
                self._queued()
        self._sent(chunks)
