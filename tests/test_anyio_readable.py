"""nbdproto_anyio's Readable: a socket stays watched from one wait to the next on asyncio, stops being watched
when bytes arrive with nobody waiting (a readable socket left watched would call back at every turn of the
loop), wakes a waiter when closed, and is anyio's wait_readable on trio."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest

from nbdproto_anyio._readable import Readable


def _watched(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bool:
    selector = loop._selector  # type: ignore[attr-defined]
    try:
        key = selector.get_key(sock.fileno())
    except KeyError:
        return False
    return bool(key.events & 1)  # EVENT_READ


def _on_a_socket_pair(body: Callable[[socket.socket, socket.socket, Readable], Awaitable[None]]) -> None:
    """Run ``body(writer, reader, Readable(reader))`` on asyncio over a fresh socket pair."""
    left, right = socket.socketpair()
    right.setblocking(False)
    with left, right:
        asyncio.run(body(left, right, Readable(right)))


def test_a_socket_stays_watched_between_waits_and_is_let_go_when_nobody_waits() -> None:
    async def main(left: socket.socket, right: socket.socket, readable: Readable) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            loop.call_later(0.01, left.send, b"x")
            with anyio.fail_after(10):
                await readable.wait()
            assert right.recv(16) == b"x"  # in the same step of the task, as a stream receives
            assert _watched(loop, right)  # still watched: the next wait registers nothing
        # The loop saw the socket readable before the bytes were received: that must not wake the next wait.
        waiting = asyncio.ensure_future(readable.wait())
        for _ in range(20):  # turns of the loop, no time: a wake for nothing would come within the first two
            await asyncio.sleep(0)
        assert not waiting.done()
        left.send(b"w")
        with anyio.fail_after(10):
            await waiting
        assert right.recv(16) == b"w"
        left.send(b"y")  # arrives while nobody waits
        for _ in range(100):  # a few turns of the loop: the callback finds no waiter and lets go
            await asyncio.sleep(0)
            if not _watched(loop, right):
                break
        assert not _watched(loop, right)
        with anyio.fail_after(10):
            await readable.wait()  # the byte is there: watched again, woken at once
        assert right.recv(16) == b"y"
        readable.close()
        assert not _watched(loop, right)

    _on_a_socket_pair(main)


def test_close_wakes_the_waiter_and_a_cancelled_wait_leaves_no_waiter() -> None:
    async def main(left: socket.socket, right: socket.socket, readable: Readable) -> None:
        with anyio.move_on_after(0.05):
            await readable.wait()  # nothing comes: cancelled
        waiting = asyncio.ensure_future(readable.wait())  # a second wait is allowed: the first is gone
        await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait (no time passes)
        assert not waiting.done()
        readable.close()
        await asyncio.wait_for(waiting, 10)

    _on_a_socket_pair(main)


def test_two_waiters_at_once_are_refused() -> None:
    async def main(left: socket.socket, right: socket.socket, readable: Readable) -> None:
        first = asyncio.ensure_future(readable.wait())
        await asyncio.sleep(0)  # one turn of the loop: the task runs up to its wait (no time passes)
        with pytest.raises(anyio.BusyResourceError):
            await readable.wait()
        left.send(b"z")
        await asyncio.wait_for(first, 10)
        readable.close()

    _on_a_socket_pair(main)


def test_on_trio_it_is_anyio_wait_readable() -> None:
    pytest.importorskip("trio")
    left, right = socket.socketpair()
    right.setblocking(False)

    async def main() -> None:
        readable = Readable(right)
        with anyio.fail_after(10):
            left.send(b"t")
            await readable.wait()
            assert right.recv(16) == b"t"
        readable.close()

    with left, right:
        anyio.run(main, backend="trio")
