"""The server's memory budget as the blocking server's connections share it: one SharedBudget per server, one
WaitingShare per connection, whose threads wait on the budget's condition for room (nbdproto.serving's
MemoryBudget holds the rules). Before a connection waits, the others are asked to give back what they hold only
until it is wanted (``settle_with``: a pipelined connection's read buffers, kept while it is idle)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import nbdproto.serving

__all__ = ["SharedBudget", "WaitingShare"]


class SharedBudget:
    """The server's memory budget (nbdproto.serving.MemoryBudget) and the condition its connections wait on
    for room: every connection's WaitingShare draws on it."""

    def __init__(self, limit: int) -> None:
        self.budget = nbdproto.serving.MemoryBudget(limit)
        self.lock = threading.RLock()  # (re-entrant, as a Condition's own: a look at the budget may hold it)
        self.room = threading.Condition(self.lock)
        self.waiting = 0  # threads waiting on ``room``, under ``lock``: notified only when there are some


class WaitingShare:
    """One connection's draw on a SharedBudget, for a server of many threads: every call is made under the
    budget's lock (its lock, entered without the condition's Python-level methods: a proxy takes and gives
    memory twice a request), and ``take`` waits on its condition until the budget has room."""

    def __init__(self, shared: SharedBudget) -> None:
        self._share = shared.budget.share()
        self._shared = shared
        self._lock = shared.lock

    def settle_with(self, settle: Callable[[], None] | None) -> None:
        """``settle()`` gives back what this connection holds only until another wants it; a connection about
        to wait for memory calls it first, holding the budget's lock, from its own thread: so it must not wait
        for a lock of this connection's (try one, and give nothing back when it is taken). None: no more."""
        with self._lock:
            self._share.settle_with(settle)

    def try_take(self, amount: int) -> bool:
        with self._lock:
            return self._share.try_take(amount)

    def take(self, amount: int, give_up: threading.Event) -> None:
        """Wait until ``amount`` can be taken (or ``give_up`` is set: then raise ConnectionAbortedError)."""
        shared, budget = self._shared, self._shared.budget
        with self._lock:
            while not self._share.try_take(amount):
                if give_up.is_set():
                    raise ConnectionAbortedError("the server is shutting down")
                if budget.settle():
                    continue  # memory that idle connections held is back: try again
                shared.waiting += 1
                try:
                    shared.room.wait(0.5)
                finally:
                    shared.waiting -= 1

    def give(self, amount: int) -> None:
        with self._lock:
            self._share.give(amount)
            if self._shared.waiting:
                self._shared.room.notify_all()

    def give_all(self) -> None:
        with self._lock:
            self._share.give_all()
            if self._shared.waiting:
                self._shared.room.notify_all()
