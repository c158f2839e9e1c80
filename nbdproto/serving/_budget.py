"""How much request and reply data a server holds in memory, per connection and server-wide: no I/O.

Two limits, both checked before memory is committed:

- ``RequestBudget``, per connection: how many requests are being carried out at once and the bytes they pin.
  A connection stops reading while it is full, so a client that pipelines faster than the device works waits
  in its own send buffer instead of filling the server's memory.
- ``MemoryBudget``, per server: the bytes of request and reply data all connections together may hold (a
  read's reply buffer until it is sent, a write's payload until the device took it). Each connection draws on
  it through a ``BudgetShare``. The rules keep one client from starving the others: a connection may hold at
  most an equal share of the limit among the connections holding any, and a connection holding nothing may
  always take a small amount (``guaranteed``), so small requests always make progress even when hoarders have
  taken everything else.

The accounting is plain arithmetic; waiting for room is the backend's (a condition variable in the threads
server, an event in the anyio one), and in the threads server every call happens under the one lock that
guards the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from nbdproto.engine import ReadRequest, Request, WritePayload, WriteRequest

__all__ = ["RequestBudget", "MemoryBudget", "BudgetShare", "MemoryShare", "DEFAULT_MEMORY_LIMIT", "request_cost"]

DEFAULT_MEMORY_LIMIT = 512 * 1024 * 1024
"""The server-wide default: enough for 16 requests of the largest payload (32 MiB) in flight."""

_GUARANTEED = 1024 * 1024


def request_cost(request: Request | WritePayload) -> int:
    """The bytes ``request`` holds in memory while it is carried out: a read's reply buffer, a write's data.

    A write's data is a view into the received chunk it arrived in, which stays alive as long as the view:
    that whole chunk is counted."""
    kind = type(request)
    if kind is WriteRequest or kind is WritePayload:
        data = request.data  # type: ignore[union-attr]
        owner = data.obj if isinstance(data, memoryview) else data
        return max(len(data), len(owner) if isinstance(owner, (bytes, bytearray)) else 0)
    if kind is ReadRequest:
        return request.length  # type: ignore[union-attr]
    return 0


class RequestBudget:
    """How much one connection has taken on: requests being carried out, and the payload bytes they hold."""

    __slots__ = ("max_requests", "max_bytes", "requests", "bytes")

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    cost = staticmethod(request_cost)

    @property
    def full(self) -> bool:
        """True while no more requests should be read."""
        return self.requests >= self.max_requests or self.bytes > self.max_bytes

    @property
    def idle(self) -> bool:
        """True when nothing is being carried out."""
        return self.requests == 0

    def add(self, cost: int) -> None:
        self.requests += 1
        self.bytes += cost

    def done(self, cost: int, count: int = 1) -> None:
        """``count`` requests holding ``cost`` bytes between them are done."""
        self.requests -= count
        self.bytes -= cost


class MemoryBudget:
    """The request and reply data a whole server may hold (``limit`` bytes), shared fairly (module docstring)."""

    __slots__ = ("limit", "guaranteed", "used", "holders", "settlers")

    def __init__(self, limit: int = DEFAULT_MEMORY_LIMIT, *, guaranteed: int = _GUARANTEED) -> None:
        if limit <= 0:
            raise ValueError(f"memory limit {limit} must be positive")
        self.limit = limit
        self.guaranteed = min(guaranteed, limit)
        self.used = 0
        self.holders = 0
        """Shares holding more than nothing."""
        self.settlers: set[Callable[[], None]] = set()
        """The shares' ``settle_with`` callables."""

    def settle(self) -> bool:
        """Before a connection waits for memory: have every share give back what its connection holds only
        until another wants it (``BudgetShare.settle_with``), called by the backend under whatever guards the
        budget; whether memory came back."""
        used = self.used
        for settle in list(self.settlers):
            settle()
        return self.used < used

    def share(self) -> BudgetShare:
        """A new connection's share."""
        return BudgetShare(self)


class MemoryShare(Protocol):
    """What a session needs of its connection's draw on the server's budget: a BudgetShare, or a backend's
    wrapper of one that makes each call under a lock."""

    def try_take(self, amount: int) -> bool: ...

    def give(self, amount: int) -> None: ...

    def give_all(self) -> None: ...


class BudgetShare:
    """One connection's draw on a MemoryBudget."""

    __slots__ = ("budget", "held", "_settle")

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0
        self._settle: Callable[[], None] | None = None

    def settle_with(self, settle: Callable[[], None] | None) -> None:
        """``settle()`` gives back what this connection holds only until another connection wants the memory
        (kept read buffers, the budget of replies other threads sent): the budget's ``settle`` calls it before
        a connection waits. None: no more."""
        settlers = self.budget.settlers
        if self._settle is not None:
            settlers.discard(self._settle)
        self._settle = settle
        if settle is not None:
            settlers.add(settle)

    def try_take(self, amount: int) -> bool:
        """Take ``amount`` bytes if the rules allow it now; False means wait until some are given back."""
        if amount <= 0:
            return True
        budget = self.budget
        held = self.held
        if held == 0:
            # Alone, a connection may take what is left (or anything, from an idle server), and a little always.
            allowed = amount <= budget.guaranteed or budget.used == 0 or budget.used + amount <= budget.limit
        else:
            fair = max(budget.guaranteed, budget.limit // budget.holders)
            allowed = budget.used + amount <= budget.limit and held + amount <= fair
        if not allowed:
            return False
        if held == 0:
            budget.holders += 1
        self.held = held + amount
        budget.used += amount
        return True

    def give(self, amount: int) -> None:
        """Give back ``amount`` bytes taken earlier."""
        if amount <= 0:
            return
        budget = self.budget
        self.held -= amount
        budget.used -= amount
        if self.held == 0:
            budget.holders -= 1

    def give_all(self) -> None:
        """Give back everything (the connection ended)."""
        self.give(self.held)
