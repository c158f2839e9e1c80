"""The server's memory and request budgets as the event-loop server's connections share them: one SharedBudget
per server and one WaitingShare per connection, whose tasks wait for room on an event set whenever memory is given
back; WaitingRequests, a connection's RequestBudget with the same waiting (nbdproto.serving holds the rules)."""

from __future__ import annotations

import anyio

import nbdproto.serving

__all__ = ["SharedBudget", "WaitingShare", "WaitingRequests"]


class SharedBudget:
    """The server's memory budget (nbdproto.serving.MemoryBudget) and the event its connections wait on for
    room, set (and renewed) whenever memory is given back: every connection's WaitingShare draws on it."""

    def __init__(self, limit: int) -> None:
        self.budget = nbdproto.serving.MemoryBudget(limit)
        self.freed = anyio.Event()


class WaitingShare(nbdproto.serving.BudgetShare):
    """One connection's draw on a SharedBudget, whose ``take`` waits for room and whose ``give`` wakes the
    connections waiting."""

    def __init__(self, shared: SharedBudget) -> None:
        super().__init__(shared.budget)
        self._shared = shared

    async def take(self, amount: int) -> None:
        while not self.try_take(amount):
            await self._shared.freed.wait()

    def give(self, amount: int) -> None:
        if amount > 0:
            super().give(amount)
            self._shared.freed.set()
            self._shared.freed = anyio.Event()


class WaitingRequests:
    """RequestBudget with the waiting an event loop needs: the reader waits for room, the end for idle."""

    def __init__(self, budget: nbdproto.serving.RequestBudget) -> None:
        self.budget = budget
        self._changed = anyio.Event()

    def add(self, cost: int) -> None:
        self.budget.add(cost)

    def done(self, cost: int, count: int = 1) -> None:
        self.budget.done(cost, count)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for_room(self) -> None:
        while self.budget.full:
            await self._changed.wait()

    async def wait_idle(self) -> None:
        while not self.budget.idle:
            await self._changed.wait()
