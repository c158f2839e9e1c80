"""The server's memory and request budgets as the event-loop server's connections share them: one SharedBudget
per server and one WaitingShare per connection, whose tasks wait for room on an event set whenever memory is given
back; WaitingRequests, a connection's RequestBudget with the same waiting (nbdproto.serving holds the rules)."""

from __future__ import annotations

import anyio

import nbdproto.serving

__all__ = ["SharedBudget", "WaitingShare", "WaitingRequests"]


class SharedBudget:
    """The server's memory budget (nbdproto.serving.MemoryBudget) and the event its connections wait on for
    room, set (and renewed) when memory is given back while a task waits: every connection's WaitingShare
    draws on it. (Setting and renewing an event costs a dozen calls: a proxy gives memory back twice a request,
    and almost never to a waiter.)"""

    def __init__(self, limit: int) -> None:
        self.budget = nbdproto.serving.MemoryBudget(limit)
        self.freed = anyio.Event()
        self.waiting = 0  # tasks waiting on ``freed``


class WaitingShare(nbdproto.serving.BudgetShare):
    """One connection's draw on a SharedBudget, whose ``take`` waits for room and whose ``give`` wakes the
    connections waiting. Before it waits, the budget's settlers are called, on the loop (``settle_with``: a
    pipelined connection's replies that other threads sent, whose budget only the loop gives back, and its idle
    read buffers)."""

    def __init__(self, shared: SharedBudget) -> None:
        super().__init__(shared.budget)
        self._shared = shared

    @property
    def others_wait(self) -> bool:
        """Whether some connection waits for memory (read from any thread)."""
        return self._shared.waiting > 0

    async def take(self, amount: int) -> None:
        shared = self._shared
        while not self.try_take(amount):
            if self.budget.settle():
                continue  # memory that sent replies held is back: try again
            shared.waiting += 1
            try:
                await shared.freed.wait()
            finally:
                shared.waiting -= 1

    def give(self, amount: int) -> None:
        if amount > 0:
            super().give(amount)
            shared = self._shared
            if shared.waiting:
                shared.freed.set()
                shared.freed = anyio.Event()


class WaitingRequests:
    """RequestBudget with the waiting an event loop needs: the reader waits for room, the end for idle."""

    def __init__(self, budget: nbdproto.serving.RequestBudget) -> None:
        self.budget = budget
        self._changed = anyio.Event()
        self._waiting = 0  # tasks waiting on ``_changed``: set (and renewed) only for them

    def add(self, cost: int) -> None:
        self.budget.add(cost)

    def done(self, cost: int, count: int = 1) -> None:
        self.budget.done(cost, count)
        if self._waiting:
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for_room(self) -> None:
        while self.budget.full:
            await self._wait()

    async def wait_idle(self) -> None:
        while not self.budget.idle:
            await self._wait()

    async def _wait(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1
