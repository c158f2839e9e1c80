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


def _answering(right: socket.socket, until: int) -> tuple[Callable[[], bool], list[bytes]]:
    """A ``ready`` for ``serve``: receive what arrived (nothing, on a stale readiness), answer it, and say the
    task must go on once ``until`` messages came or one asks to fail."""
    got: list[bytes] = []

    def ready() -> bool:
        try:
            data = right.recv(16)
        except BlockingIOError:
            return False
        if _in_a_task():
            got.append(b"(called in a task)")
        if data == b"fail":
            raise ValueError("asked to")
        got.append(data)
        right.send(b"re:" + data)
        return len(got) >= until

    return ready, got


def _in_a_task() -> bool:
    try:
        return asyncio.current_task() is not None
    except RuntimeError:  # not on asyncio
        return False


def test_serve_answers_in_the_loop_s_callback_and_wakes_the_task_once() -> None:
    """On asyncio the loop's callback calls ``ready`` for every message (the task does not run between them:
    its code after the await runs once), a readiness seen before the bytes were taken costs a receive that finds
    nothing, and an exception ``ready`` raises is the task's."""

    async def main(left: socket.socket, right: socket.socket, readable: Readable) -> None:
        loop = asyncio.get_running_loop()
        ready, got = _answering(right, 3)
        resumed = 0

        async def serving() -> None:
            nonlocal resumed
            await readable.serve(ready)
            resumed += 1

        task = asyncio.ensure_future(serving())
        left.setblocking(True)
        left.settimeout(10)
        for message in (b"one", b"two", b"three"):
            left.send(message)
            assert await loop.run_in_executor(None, left.recv, 16) == b"re:" + message
            assert resumed == 0 or message == b"three"
        with anyio.fail_after(10):
            await task
        assert got == [b"one", b"two", b"three"] and resumed == 1
        assert _watched(loop, right)  # (still watched: the next wait or serve registers nothing)
        left.send(b"fail")
        with pytest.raises(ValueError, match="asked to"), anyio.fail_after(10):
            await readable.serve(_answering(right, 1)[0])
        with anyio.fail_after(10):  # and it serves again
            left.send(b"four")
            await readable.serve(_answering(right, 1)[0])
        assert left.recv(16) == b"re:four"

    _on_a_socket_pair(main)


def test_on_trio_serve_calls_ready_after_each_wait() -> None:
    left, right = socket.socketpair()
    right.setblocking(False)

    async def main() -> None:
        ready, got = _answering(right, 2)
        left.send(b"a")
        left.send(b"b")  # (may arrive with "a": one receive takes both)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(anyio.to_thread.run_sync, _send_later, left)
            with anyio.fail_after(10):
                await Readable(right).serve(ready)
        assert b"".join(got).startswith(b"ab")

    with left, right:
        anyio.run(main, backend="trio")


def _send_later(sock: socket.socket) -> None:
    sock.send(b"c")
