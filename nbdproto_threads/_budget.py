"""The server's memory budget as the blocking server's connections share it: one SharedBudget per server, one
WaitingShare per connection, whose threads wait on the budget's condition for room (nbdproto.serving's
MemoryBudget holds the rules)."""

from __future__ import annotations

import threading

import nbdproto.serving

__all__ = ["SharedBudget", "WaitingShare"]


class SharedBudget:
    """The server's memory budget (nbdproto.serving.MemoryBudget) and the condition its connections wait on
    for room: every connection's WaitingShare draws on it."""

    def __init__(self, limit: int) -> None:
        self.budget = nbdproto.serving.MemoryBudget(limit)
        self.room = threading.Condition()


class WaitingShare:
    """One connection's draw on a SharedBudget, for a server of many threads: every call is made under the
    budget's lock, and ``take`` waits there until the budget has room."""

    def __init__(self, shared: SharedBudget) -> None:
        self._share = shared.budget.share()
        self._room = shared.room

    def try_take(self, amount: int) -> bool:
        with self._room:
            return self._share.try_take(amount)

    def take(self, amount: int, give_up: threading.Event) -> None:
        """Wait until ``amount`` can be taken (or ``give_up`` is set: then raise ConnectionAbortedError)."""
        with self._room:
            while not self._share.try_take(amount):
                if give_up.is_set():
                    raise ConnectionAbortedError("the server is shutting down")
                self._room.wait(0.5)

    def give(self, amount: int) -> None:
        with self._room:
            self._share.give(amount)
            self._room.notify_all()

    def give_all(self) -> None:
        with self._room:
            self._share.give_all()
            self._room.notify_all()
