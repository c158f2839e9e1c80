"""Pipelined transmission, its I/O-free half: requests handed to a device that takes them without waiting for
them (its ``submit``: see nbdproto.serving.BlockDevice), and replies made as their results come back, in any
order, many at a time.

The point is a proxy's: a remote export answers after a round trip, and a server that carried each batch of
requests out before reading the next (a "batch" device's dispatch) left the remote idle while it read and
answered its client, and its client idle while it waited for the remote: requests crossed in lockstep, a batch
at a time. With a pipeline the driver reads requests and starts them as they come (``start``), as many in
flight as its budgets allow, while the device's own threads take the results in; each burst of them wakes the
driver once (``wake``), which makes every reply ready (``replies``) and answers them with one send.

A driver of either backend::

    pipeline = logic.pipeline(wake)              # wake(): from any thread, "replies are ready"
    ... for each batch of requests read, within the budgets:
    pipeline.start(requests, costs)              # may block (to send upstream, to reconnect): off the loop
    ... when woken:
    replies, cost = pipeline.replies()           # with the engine: engine.send(each), send, give ``cost`` back
    ... at the end: pipeline.close()

Flush semantics are the device's requests' own: a request is answered only once the device completed it, so a
flush the client sends after a write was answered reaches the device after the write completed there. A
request the device fails gets its error reply (``error_reply_for``), as carried out any other way.
"""

from __future__ import annotations

import errno
import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from nbdproto.engine import Event, ReadData, ReadRequest, Request, SuccessReply, WritePayload, WriteRequest

from ._carry_out import DeviceCall, OnError, device_calls, error_reply_for, reply_for, write_view_ended

__all__ = ["Pipeline", "submitting", "StartRequests", "WaitForRoom", "CarryOutPart", "PipelineStep"]


def submitting(device: object) -> bool:
    """Whether ``device`` takes calls without waiting for them (``submit``): then a server pipelines."""
    return callable(getattr(device, "submit", None))


class StartRequests:
    """A step of ``pipelined_batch``: start ``requests`` on the pipeline (``Pipeline.start``, each holding its
    ``costs`` entry of the budgets until its reply is sent)."""

    __slots__ = ("requests", "costs")

    def __init__(self, requests: list[Request], costs: list[int]) -> None:
        self.requests = requests
        self.costs = costs


class WaitForRoom:
    """A step of ``pipelined_batch``: the connection's request budget is full or its share of the server's
    memory is short. Send the replies ready, wait until the request budget has room, then take ``cost`` bytes
    from the share (waiting for them): the request is admitted with them."""

    __slots__ = ("cost",)

    def __init__(self, cost: int) -> None:
        self.cost = cost


class CarryOutPart:
    """A step of ``pipelined_batch``: carry out ``part`` of a streamed write here, in order with the other
    parts (``carry_out_part``), and send its reply if it gives one."""

    __slots__ = ("part",)

    def __init__(self, part: WriteRequest | WritePayload) -> None:
        self.part = part


PipelineStep = StartRequests | WaitForRoom | CarryOutPart
"""What ``pipelined_batch`` asks of a pipelined driver, in order."""


class _Started:
    """A request in flight: its device calls, their results as they come, and the budget it holds."""

    __slots__ = ("request", "calls", "results", "left", "cost")

    def __init__(self, request: Request, calls: list[DeviceCall], cost: int) -> None:
        self.request = request
        self.calls = calls
        self.results: list[object] = [None] * len(calls)
        self.left = len(calls)
        self.cost = cost


_LANES = itertools.count()


class Pipeline:
    """One connection's requests in flight on a device with ``submit``; also the ``Completions`` the device
    reports to. ``wake()`` is called, from whichever thread has results, when replies become ready and the
    driver has not been woken since it last took them (at most one wake between two ``replies``)."""

    lane: int
    """This connection's lane (see Completions): pipelines made one after another get lanes in turn. A proxy
    whose requests of one client went out over several connections upstream took their replies in on as many
    threads, each waking this one's driver: with one client at QD16, 0.77x the requests a second of one
    connection upstream (bench/bench_proxy.sh's reads, threads backend)."""

    def __init__(
        self, device: Any, meta_contexts: Mapping[int, str], on_error: OnError | None, wake: Callable[[], None]
    ) -> None:
        self.lane = next(_LANES)
        self._device = device
        self._submit = device.submit
        self._submit_nowait = getattr(device, "submit_nowait", None)
        self._contexts = meta_contexts
        self._on_error = on_error
        self._wake = wake
        self._results: deque[tuple[Any, object]] = deque()  # appends and pops are atomic: no lock between threads
        self._woken = False
        self._closed = False

    # --- Completions (any thread) -----------------------------------------------------------------------------

    def complete(self, token: Any, result: object) -> None:
        self._results.append((token, result))

    def completed(self) -> None:
        if not self._woken and not self._closed:
            self._woken = True  # (two threads may both wake: one wake too many costs one empty look)
            self._wake()

    # --- The driver's side ----------------------------------------------------------------------------------

    def start(self, requests: Sequence[Request], costs: Sequence[int]) -> None:
        """Start ``requests`` (each holding its ``costs`` entry of the budget until its reply is made): all their
        device calls in one ``submit``. May block (the device's sends); never waits for results."""
        calls, tokens, done = self._calls(requests, costs)
        if calls:
            self._submit(calls, tokens, self)
        self._done_already(done)

    def start_nowait(self, requests: Sequence[Request], costs: Sequence[int]) -> Callable[[], None] | None:
        """``start``, for an event loop, through the device's ``submit_nowait``: raises BlockingIOError, having
        started nothing, where that would wait (a device without it included): then ``start`` them from a
        thread. Returns None, or a callable that finishes sending them, to be called from a thread, soon."""
        submit = self._submit_nowait
        if submit is None:
            raise BlockingIOError(errno.EAGAIN, "the device has no submit_nowait")
        calls, tokens, done = self._calls(requests, costs)
        rest = submit(calls, tokens, self) if calls else None
        self._done_already(done)
        return rest

    def _calls(
        self, requests: Sequence[Request], costs: Sequence[int]
    ) -> tuple[list[DeviceCall], list[Any], list[_Started]]:
        """The device calls of ``requests``, their tokens, and the requests that need none (done already)."""
        calls: list[DeviceCall] = []
        tokens: list[Any] = []
        done: list[_Started] = []
        for request, cost in zip(requests, costs, strict=True):
            these = device_calls(request, self._contexts)
            started = _Started(request, these, cost)
            if len(these) == 1:
                calls.append(these[0])
                tokens.append(started)
            elif not these:  # a write received in place, without FUA: done already
                done.append(started)
            else:
                calls += these
                tokens += [(started, index) for index in range(len(these))]
        return calls, tokens, done

    def _done_already(self, done: list[_Started]) -> None:
        if done:
            self._results.extend((started, None) for started in done)
            self.completed()

    def replies(self) -> tuple[list[Event], int]:
        """The replies of every request whose results are all in, in the order they completed, and the budget
        they held (give it back once they are sent)."""
        self._woken = False  # before taking: a result that comes after this wakes the driver again
        results, replies, cost = self._results, [], 0
        while results:
            token, result = results.popleft()
            if type(token) is tuple:
                started, index = token
                started.results[index] = result
                started.left -= 1
                if started.left > 0:
                    continue
            else:
                started = token
                if started.calls:
                    started.results[0] = result
            replies.append(self._reply(started))
            cost += started.cost
        return replies, cost

    def _reply(self, started: _Started) -> Event:
        request, results = started.request, started.results
        if type(request) is ReadRequest and results[0] is None:  # the commonest first
            return ReadData(request.cookie, request.offset, started.calls[0].args[0])
        if type(request) is WriteRequest and not request.in_place and results[0] is None:  # its one pwrite went well
            return SuccessReply(request.cookie)
        if type(request) is WriteRequest and request.in_place:
            write_view_ended(self._device, request)
        failure = next((result for result in results if isinstance(result, BaseException)), None)
        if failure is None:
            return reply_for(request, started.calls, results)
        if self._on_error is not None:
            self._on_error(request, failure)
        return error_reply_for(request, failure)

    def close(self) -> None:
        """The connection is over: results that still come are dropped, and wake nobody."""
        self._closed = True
