"""Waiting for a connection's socket to become readable, without watching and unwatching it at every wait.

anyio's ``wait_readable`` on asyncio registers the socket with the event loop's selector and removes it again
at every wait: two ``epoll_ctl`` calls and the selector's Python bookkeeping each time. A server at queue depth
16 waits about once per request, and py-spy (``--gil``, 4 KiB writes QD16 on the asyncio loop) put the
registering and unregistering at 15% of the server's time. ``Readable`` keeps the socket watched from one
wait to the next: the loop's callback wakes the waiter, and only when it finds nobody waiting (bytes arrived
while the task was busy) does it stop watching, since a watched socket that stays readable would call it at
every turn of the loop. The loop's watch is level-triggered, so a readiness it saw before a wait began (the
bytes the task received meanwhile) is ignored rather than waking the waiter for nothing. On any other loop
(trio) it is anyio's ``wait_readable``.

``serve(ready)`` goes further for a loop that answers one request at a time: the loop's callback itself calls
``ready()`` (receive, answer, send) each time the socket is readable, and wakes the task only once ``ready()``
says so. A request then costs one turn of the loop, where a wait cost a future, a task woken and resumed, and a
turn more for the check above (the server's one-request road: ``_server.ServerSession._answer_lone_reads``).

The socket must not be closed while it is watched: ``close()`` first (the streams' ``aclose`` does), which
also wakes a task still waiting, so that its next receive finds the socket closed instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import anyio

__all__ = ["Readable"]


class Readable:
    """Waits for one socket to be readable (see the module docstring); one waiting task at a time."""

    __slots__ = ("_sock", "_loop", "_fd", "_waiter", "_watching", "_fresh", "_serving")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None  # the asyncio loop, once known (None: not asyncio)
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False
        self._fresh = False  # the loop has looked at the socket since the waiter began waiting
        self._serving: Callable[[], bool] | None = None  # serve()'s ready, while it serves

    async def wait(self) -> None:
        """Return once the socket is readable (or was closed meanwhile, by ``close``)."""
        waiter = self._begin()
        if waiter is None:  # not on asyncio (trio)
            await anyio.wait_readable(self._sock)
            return
        self._fresh = False
        # A readiness the loop saw before this wait began (the bytes the task has just received, still there
        # when the loop looked) may already be queued: _ready ignores it until this has run, after it.
        waiter.get_loop().call_soon(self._freshen, waiter)
        try:
            await waiter
        finally:
            self._waiter = None

    async def serve(self, ready: Callable[[], bool]) -> None:
        """Call ``ready()`` each time the socket is readable, until it returns True; an exception it raises is
        raised here. On asyncio the loop's callback calls it (see the module docstring), so ``ready`` must find
        out for itself whether bytes arrived (a receive that does not wait): a readiness the loop saw before may
        be stale. Elsewhere (trio) this task calls it after each wait."""
        waiter = self._begin()
        if waiter is None:  # not on asyncio (trio)
            while True:
                await anyio.wait_readable(self._sock)
                if ready():
                    return
        self._serving = ready
        try:
            await waiter
        finally:
            self._waiter = self._serving = None

    def _begin(self) -> asyncio.Future[None] | None:
        """The waiter of a wait about to begin, the socket watched; None when not on asyncio."""
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            self._loop, self._fd = loop, self._sock.fileno()
        if self._waiter is not None:
            raise anyio.BusyResourceError("reading from")
        waiter: asyncio.Future[None] = loop.create_future()
        if not self._watching:
            loop.add_reader(self._fd, self._ready)
            self._watching = True
        self._waiter = waiter
        return waiter

    def _freshen(self, waiter: asyncio.Future[None]) -> None:
        if self._waiter is waiter:
            self._fresh = True

    def _ready(self) -> None:
        waiter = self._waiter
        if waiter is None:
            self._unwatch()  # nobody waits now: stop watching until somebody does
            return
        if (ready := self._serving) is not None:
            try:
                if not ready():
                    return
            except Exception as exc:
                self._waiter = self._serving = None
                if not waiter.done():
                    waiter.set_exception(exc)
                return
            self._waiter = self._serving = None
            if not waiter.done():
                waiter.set_result(None)
            return
        if not self._fresh:
            return  # seen before the wait began: the loop's next look says whether bytes are there now
        self._waiter = None
        if not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None:
            self._watching = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop watching the socket (before it is closed or handed to another stream), and wake a waiter."""
        self._unwatch()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
