"""WriteGate: the changes in flight through a bitmap filter, and the instant between two requests.

A bitmap operation (adding, clearing or resizing a bitmap, a checkpoint) must happen at an instant at which no
change is in flight: a write that started before it and lands after it would be in neither the bitmap that
ended nor the one that began. ``quiesced()`` makes that instant. Two kinds of change are counted:

- **device calls** (``pwrite``, ``write_zeroes``, ``trim``, a batch): from the call to its return, in
  ``_writing``. While a quiesce holds the gate, new ones wait at it (``_wait_at_gate``).
- **writes received in place** (``write_view``): from the moment the engine asks for the view, as the write's
  header is parsed, until the serving logic says nothing more will arrive in it (``write_view_ended``: the
  request was carried out, or the connection ended part-way), in ``_viewing``. Their payloads arrive while the
  server goes on serving, so a quiesce never makes them wait: it first stops handing out views (the writes
  that come then are received into buffers and go through ``pwrite``) and waits for the views handed out to
  end, and only then holds device calls back at the gate. Holding writes back first could stop the very
  receive a view waits for: on an event loop a write held at the gate holds the loop.

A token is counted before the gate or the view door is looked at, and a quiesce closes them before it waits
for the counts to reach zero, so every change either finishes before the instant or starts after it. The
counts are sets changed without a lock (``set.add`` and ``set.discard`` are atomic in CPython): the write path
costs two set operations and a test.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
import time
from collections.abc import Iterator

__all__ = ["WriteGate"]

_POLL = 0.05  # a quiesce looks at the changes in flight at least this often, wake-ups aside


class WriteGate:
    """The counts and the gate of one bitmap filter (see the module docstring). ``timeout`` bounds how long a
    quiesce waits for changes in flight (TimeoutError) and how long a change waits at the gate (ETIMEDOUT)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._writing: set[int] = set()
        self._viewing: set[int] = set()
        self._ids = itertools.count()
        self._gate: threading.Event | None = None
        self._views_closed = False
        self._depth = 0
        self._admin = threading.RLock()  # bitmap operations and quiesces, one at a time
        self._idle = threading.Condition()

    def _end(self, token: int) -> None:
        self._writing.discard(token)
        if self._gate is not None:
            self._wake()

    def _end_view(self, token: int) -> None:
        self._viewing.discard(token)
        if self._views_closed:
            self._wake()

    def _wake(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _wait_at_gate(self, token: int) -> None:
        """Wait (``token`` counted in ``_writing``, and left there) while a quiesce holds changes back."""
        while True:
            gate = self._gate
            if gate is None:
                return
            self._end(token)
            if not gate.wait(self._timeout):
                self._writing.add(token)  # the caller's finally takes it out again
                raise OSError(errno.ETIMEDOUT, f"a bitmap operation held writes back for over {self._timeout:g} s")
            self._writing.add(token)

    def _drain(self, tokens: set[int], deadline: float, limit: float, what: str) -> None:
        with self._idle:
            while tokens:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} did not finish within {limit:g} s")
                self._idle.wait(min(left, _POLL))

    @contextlib.contextmanager
    def quiesced(self, timeout: float | None = None) -> Iterator[None]:
        """Inside the block no write, write-zeroes or trim is in flight and none starts (they wait), and no
        write is being received in place: the instant between two requests (module docstring). TimeoutError
        when what is in flight does not finish within ``timeout`` seconds (default: the filter's
        ``quiesce_timeout``). Blocks nest in one thread."""
        limit = self._timeout if timeout is None else timeout
        if not self._admin.acquire(timeout=limit):
            raise TimeoutError(f"another bitmap operation took over {limit:g} s")
        try:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            deadline = time.monotonic() + limit
            self._views_closed = True
            try:
                self._drain(self._viewing, deadline, limit, "writes being received in place")
                gate = threading.Event()
                self._gate = gate
                try:
                    self._drain(self._writing, deadline, limit, "writes in flight")
                    self._depth = 1
                    yield
                finally:
                    self._depth = 0
                    self._gate = None
                    gate.set()
            finally:
                self._views_closed = False
        finally:
            self._admin.release()
