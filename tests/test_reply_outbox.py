"""ReplyOutbox: a pipelined connection's replies go out from the thread that made them when the socket takes them
at once and nothing else is being sent; everything else waits for the connection's sender, in order; each burst's
budget comes back once it is out (or never will be)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import pytest

from nbdproto.serving import SEND_NOW_AT_MOST, ReplyOutbox, pieces_of

pytestmark = pytest.mark.timeout(30)


class _Engine:
    """The engine's two calls the outbox makes: a reply becomes its bytes, queued until taken."""

    def __init__(self) -> None:
        self.queued: list[Any] = []

    def send(self, reply: Any) -> None:
        self.queued.append(reply)

    def data_to_send(self) -> list[Any]:
        pieces, self.queued = self.queued, []
        return pieces


class _Pipeline:
    """Replies ready, in bursts, each with the budget it held."""

    def __init__(self) -> None:
        self.bursts: deque[tuple[list[Any], int]] = deque()

    def replies(self) -> tuple[list[Any], int]:
        return self.bursts.popleft() if self.bursts else ([], 0)


class _Box:
    """An outbox over a fake engine and pipeline, recording what each callback was given, by which thread."""

    def __init__(self, send_now: Any = "default") -> None:
        self.engine, self.pipeline = _Engine(), _Pipeline()
        self.sends: list[tuple[list[Any], str]] = []  # what send_now sent, and the thread's name
        self.queued = 0
        self.given: list[tuple[list[Any], int]] = []  # (replies, cost) of each chunk sent() got
        self.outbox = ReplyOutbox(
            self.engine,
            threading.Lock(),
            send_now=self._send_now if send_now == "default" else send_now,
            queued=self._queued,
            sent=self._sent,
        )
        self.outbox.pipeline = self.pipeline  # type: ignore[assignment]

    def _send_now(self, pieces: list[Any]) -> list[Any] | None:
        self.sends.append((list(pieces), threading.current_thread().name))
        return None

    def _queued(self) -> None:
        self.queued += 1

    def _sent(self, chunks: list[Any]) -> None:
        self.given += [(chunk[1], chunk[2]) for chunk in chunks]

    def burst(self, *replies: bytes, cost: int | None = None) -> None:
        self.pipeline.bursts.append((list(replies), sum(map(len, replies)) if cost is None else cost))

    def take(self) -> list[Any] | None:
        with self.outbox.lock:
            return self.outbox.take()


def test_the_thread_that_made_replies_sends_them_at_once() -> None:
    box = _Box()
    box.burst(b"r1", b"r2")
    thread = threading.Thread(target=box.outbox.flush, name="device-reader")
    thread.start()
    thread.join()
    assert box.sends == [([b"r1", b"r2"], "device-reader")]
    assert box.given == [([b"r1", b"r2"], 4)] and box.queued == 0 and box.take() is None


def test_replies_made_while_another_thread_sends_wait_for_the_sender_in_order() -> None:
    sending, release = threading.Event(), threading.Event()
    box = _Box()

    def slow_send(pieces: list[Any]) -> None:
        box.sends.append((list(pieces), threading.current_thread().name))
        sending.set()
        assert release.wait(10)

    box.outbox._send_now = slow_send
    box.burst(b"first")
    first = threading.Thread(target=box.outbox.flush, name="one")
    first.start()
    assert sending.wait(10)
    box.burst(b"second")
    box.burst(b"third")
    box.outbox.flush()  # while "one" sends: queued, not sent here
    box.outbox.flush()
    assert box.sends == [([b"first"], "one")] and box.queued == 2
    assert box.take() is None  # the sender waits until "one" is done
    release.set()
    first.join()
    assert box.given == [([b"first"], 5)]
    chunks = box.take()
    assert chunks is not None and pieces_of(chunks) == [b"second", b"third"]
    assert box.given == [([b"first"], 5)]  # not given back before they are sent
    box.outbox.done(chunks, failed=False)
    assert box.given == [([b"first"], 5), ([b"second"], 6), ([b"third"], 5)]


def test_what_a_send_left_goes_to_the_sender_before_anything_queued_later() -> None:
    box = _Box(send_now=lambda pieces: [memoryview(pieces[-1])[2:]])
    box.burst(b"head", b"tail!")
    box.outbox.flush()
    assert box.queued == 1 and box.given == []  # held until all of it is out
    box.burst(b"later")
    box.outbox.flush()
    chunks = box.take()
    assert chunks is not None and [bytes(piece) for piece in pieces_of(chunks)] == [b"il!", b"later"]
    box.outbox.done(chunks, failed=False)
    assert box.given == [([b"head", b"tail!"], 9), ([b"later"], 5)]


def test_a_burst_larger_than_the_limit_goes_to_the_sender() -> None:
    box = _Box()
    big = bytes(SEND_NOW_AT_MOST + 1)
    box.burst(big)
    box.outbox.flush()
    assert box.sends == [] and box.queued == 1
    chunks = box.take()
    assert chunks is not None and pieces_of(chunks) == [big]
    box.burst(bytes(SEND_NOW_AT_MOST))  # (the limit itself is sent at once: the sender is done first)
    box.outbox.done(chunks, failed=False)
    box.outbox.flush()
    assert box.sends == [([bytes(SEND_NOW_AT_MOST)], threading.current_thread().name)]


def test_without_a_send_that_does_not_wait_the_sender_sends_everything() -> None:
    box = _Box(send_now=None)  # (a TLS connection: its TLS object is its sender's alone)
    box.burst(b"r1")
    box.outbox.flush()
    assert box.queued == 1 and box.given == []
    chunks = box.take()
    assert chunks is not None and pieces_of(chunks) == [b"r1"]


def test_a_failed_send_gives_the_budget_back_and_nothing_more_is_sent_at_once() -> None:
    def broken(pieces: list[Any]) -> None:
        raise BrokenPipeError

    box = _Box(send_now=broken)
    box.burst(b"r1")
    box.outbox.flush()
    assert box.outbox.broken and box.given == [([b"r1"], 2)]
    box.burst(b"r2")
    box.outbox.flush()  # to the sender, which sends nothing to a client gone: it gives the budget back
    chunks = box.take()
    assert chunks is not None
    box.outbox.done(chunks, failed=True)
    assert box.given == [([b"r1"], 2), ([b"r2"], 2)]


def test_the_session_s_own_replies_go_out_with_the_pipeline_s() -> None:
    box = _Box()
    box.engine.send(b"error reply")
    box.burst(b"r1")
    box.outbox.flush()
    assert box.sends == [([b"error reply", b"r1"], threading.current_thread().name)]


def test_nothing_is_made_or_sent_once_stopped() -> None:
    box = _Box()
    box.outbox.stop()
    assert box.queued == 1  # (a sender waiting hears of it)
    box.burst(b"r1")
    box.outbox.flush()
    assert box.sends == [] and box.pipeline.bursts and box.take() is None
