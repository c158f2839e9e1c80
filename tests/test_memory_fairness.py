"""The server's memory budget between clients, on real servers of every backend: several clients hoard memory
at once (reads whose replies they do not read), each is held to its share of the limit, and a client with
small requests goes on being served all the while (nbdproto.serving.MemoryBudget states the rules).

The clients take turns, and each turn ends in a state the test observes rather than waits for: the device of
each hoarder's export counts the reads the server carried out for it (a read holds its reply's memory until
the reply is sent, and a reply of 1 MiB never fits in a unix socket's buffer), and a connection that wants
more than it may have is seen waiting for the budget: a server thread, or an event loop's task, suspended in
the backend's wait for room. The turn is over when every hoarder with requests left waits there holding
exactly the reads it got, or has none left; then the counts must be the rules' to the byte.
"""

from __future__ import annotations

import gc
import inspect
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import nbdproto as n
import nbdproto.serving
import nbdproto.wire
import nbdproto_anyio._budget
import nbdproto_threads
import nbdproto_threads._budget
from nbdproto.devices import Filter, MemoryDevice
from tests.nbdbytes import request
from tests.serving import BACKENDS, Export, serving
from tests.test_bad_input import RawClient
from tests.waiting import wait_until

MIB = 1 << 20
T = TypeVar("T")
LIMIT = 8 * MIB  # the server's memory limit; a connection holding nothing may always take 1 MiB (guaranteed)
pytestmark = pytest.mark.timeout(120)


class CountedReads(Filter):
    """A memory device whose reads are counted, carried out in worker threads (so that many are in flight at
    once), with no views of its memory: each read fills a reply buffer that the budget pays for."""

    def __init__(self) -> None:
        super().__init__(MemoryDevice(16 * MIB))
        self.dispatch = "threads"
        self.reads = 0
        self._lock = threading.Lock()

    def pread_into(self, buffer: memoryview, offset: int) -> None:
        self.inner.pread_into(buffer, offset)
        with self._lock:
            self.reads += 1


def budget_of(server: Any) -> Any:
    """The server's memory budget: the backend's SharedBudget its connections draw on."""
    if isinstance(server, nbdproto_threads.Server):
        return server._memory
    return wait_until(lambda: server._budget, "the anyio server's budget (made as serve() begins)")


def _asleep_threads(room: threading.Condition) -> list[int]:
    """What each server thread asleep in WaitingShare.take holds: its wait in the budget's condition began
    after its last refusal, and no give has woken it since (its waiter is still in the condition's queue).
    Called with the condition held, so that none is woken meanwhile."""
    take, wait = nbdproto_threads._budget.WaitingShare.take.__code__, threading.Condition.wait.__code__
    held = []
    for frame in sys._current_frames().values():
        caller = frame.f_back
        if frame.f_code is not wait or caller is None or caller.f_code is not take:
            continue
        if frame.f_locals["self"] is room and frame.f_locals["waiter"] in room._waiters:  # type: ignore[attr-defined]
            held.append(caller.f_locals["self"]._share.held)
    return sorted(held)


def _asleep_tasks() -> list[int]:
    """What each event loop task suspended in the anyio backend's WaitingShare.take holds, where the event it
    waits on has not been set (a give sets it: the task then looks again)."""
    take = nbdproto_anyio._budget.WaitingShare.take.__code__
    held = []
    for thing in gc.get_objects():
        if not inspect.iscoroutine(thing):
            continue
        # Each frame read once: the loop runs in another thread, and a coroutine may finish (its frame None)
        # between two reads of it. budget_state looks again when anything changed meanwhile.
        frame = thing.cr_frame
        if frame is None or frame.f_code is not take:
            continue
        awaited = thing.cr_await
        waiting = None if awaited is None else awaited.cr_frame
        if waiting is not None and not waiting.f_locals["self"].is_set():
            held.append(frame.f_locals["self"].held)
    return sorted(held)


def budget_state(shared: Any, look: Callable[[], T]) -> tuple[list[int], int, T] | None:
    """The budget at one moment: what each connection asleep waiting for it holds, what all hold, and
    ``look()`` then (None when the budget changed while it was looked at)."""
    if isinstance(shared, nbdproto_threads._budget.SharedBudget):
        with shared.room:  # every take and give is made under it
            return _asleep_threads(shared.room), shared.budget.used, look()
    used = shared.budget.used
    asleep = _asleep_tasks()
    seen = look()
    return (asleep, used, seen) if shared.budget.used == used else None


class Hoarder:
    """A client of its own export that asks for reads and does not read the replies until told to."""

    def __init__(self, path: str, name: str, device: CountedReads) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(path)
        self.client = RawClient(sock)
        self.client.go(name)
        self.device = device
        self.sizes: list[int] = []
        self.read_back = 0

    def ask(self, *sizes: int) -> None:
        start = len(self.sizes)
        self.client.sock.sendall(b"".join(request(n.Command.READ, start + i, 0, size) for i, size in enumerate(sizes)))
        self.sizes += sizes

    @property
    def carried_out(self) -> int:
        """The bytes of the reads the server carried out."""
        return sum(self.sizes[: self.device.reads])

    @property
    def holding(self) -> int:
        """What the replies carried out and not read hold: the memory this client holds on the server."""
        return self.carried_out - self.read_back

    @property
    def pending(self) -> bool:
        return self.device.reads < len(self.sizes)

    def read_replies(self) -> None:
        """Read every reply (in the order they come: a server carrying reads out at once sends them so)."""
        left = dict(enumerate(self.sizes))
        while left:
            magic, error, cookie = struct.unpack(">IIQ", self.client.recv_exactly(16))
            assert (magic, error) == (n.wire.SIMPLE_REPLY_MAGIC, 0) and cookie in left, (magic, error, cookie)
            assert self.client.recv_exactly(left.pop(cookie)) == bytes(self.sizes[cookie])
        self.read_back = sum(self.sizes)


def settled(shared: Any, hoarders: dict[str, Hoarder]) -> tuple[dict[str, int], list[int]]:
    """Wait until every hoarder with requests left is asleep waiting for the budget holding what was carried out
    for it, the others have none left, and the server's budget holds just what the hoarders' unread replies do
    (so no give is on its way); then the reads carried out for each hoarder, in bytes, and what each sleeping
    connection holds."""

    def look() -> dict[str, tuple[int, int, bool]]:
        return {name: (h.carried_out, h.holding, h.pending) for name, h in hoarders.items()}

    def observe() -> tuple[dict[str, int], list[int]] | None:
        state = budget_state(shared, look)
        if state is None:
            return None
        asleep, used, seen = state
        pending = sorted(holding for _, holding, left in seen.values() if left)
        if asleep != pending or used != sum(holding for _, holding, _ in seen.values()):
            return None
        return {name: carried_out for name, (carried_out, _, _) in seen.items()}, asleep

    return wait_until(observe, "every hoarder done, or asleep waiting for the budget with what it got", every=0.05)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[Callable[[str], Hoarder], str, Any]]:
    """A server of the backend with LIMIT, exports a, b, c and d (CountedReads) and small, on a unix socket: a
    function that connects a hoarder to an export, the socket's path, and the server's budget."""
    devices = {name: CountedReads() for name in "abcd"}
    exports = {name: Export(device) for name, device in devices.items()}
    exports["small"] = Export(MemoryDevice(MIB))
    limits = n.ServerLimits(memory_limit=LIMIT)
    with serving(request.param, exports, unix=True, workers=16, limits=limits) as (uri, running):
        path = uri.split("socket=")[1]
        yield (lambda name: Hoarder(path, name, devices[name])), path, budget_of(running)


@pytest.mark.parametrize("server", BACKENDS, indirect=True)
def test_hoarding_clients_are_each_held_to_their_share_while_small_requests_go_on(server: Any) -> None:
    hoarder, path, shared = server
    a, b, c, d = (hoarder(name) for name in "abcd")
    everyone = {"a": a, "b": b, "c": c, "d": d}

    def holding(**held: int) -> dict[str, int]:
        return {name: held.get(name, 0) * MIB for name in everyone}

    # Alone, a connection may take what it likes of the limit.
    a.ask(*[MIB] * 4)
    assert settled(shared, everyone) == (holding(a=4), [])
    # A newcomer may take more than the guaranteed 1 MiB in one request, as long as it fits in what is left.
    b.ask(3 * MIB)
    assert settled(shared, everyone) == (holding(a=4, b=3), [])
    # A third gets the guaranteed 1 MiB, and no more once the limit is reached, though its fair share
    # (a third of the limit) is larger: the limit holds for all connections together.
    c.ask(*[MIB] * 8)
    assert settled(shared, everyone) == (holding(a=4, b=3, c=1), [MIB])
    # Small requests go on all the while: a connection holding nothing may always take a little.
    small = RawClient(_unix(path))
    small.go("small")
    for cookie in range(8):
        block = os.urandom(4096)
        small.sock.sendall(request(n.Command.WRITE, cookie, cookie * 4096, 4096) + block)
        assert small.simple_reply(cookie) == (0, b"")
        small.sock.sendall(request(n.Command.READ, 100 + cookie, cookie * 4096, 4096))
        assert small.simple_reply(100 + cookie, 4096) == (0, block)
    # The first gives its 4 MiB back: the waiting one may now grow to an equal share (half the limit, with two
    # holding memory) and no further, though the limit would allow one more.
    a.read_replies()
    assert settled(shared, everyone) == (holding(a=4, b=3, c=4), [4 * MIB])
    # Alone again, it takes the rest of what it asked for: the whole limit.
    b.read_replies()
    assert settled(shared, everyone) == (holding(a=4, b=3, c=8), [])
    # A newcomer's request of more than the guaranteed amount waits while it does not fit, holding nothing...
    d.ask(2 * MIB)
    assert settled(shared, everyone) == (holding(a=4, b=3, c=8), [0])
    # ... and is carried out once it does.
    c.read_replies()
    assert settled(shared, everyone) == (holding(a=4, b=3, c=8, d=2), [])
    d.read_replies()
    for client in (a.client, b.client, c.client, d.client, small):
        client.close()


def _unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def test_the_watch_sees_a_thread_asleep_waiting_for_the_budget() -> None:
    """budget_state itself: a share that cannot take more is seen asleep, with what it holds, and not once a
    give woke it (whether or not it has taken its room yet)."""
    shared = nbdproto_threads._budget.SharedBudget(LIMIT)
    first, second = (nbdproto_threads._budget.WaitingShare(shared) for _ in range(2))
    assert first.try_take(LIMIT) and second.try_take(MIB)
    waiter = threading.Thread(target=second.take, args=(MIB, threading.Event()), daemon=True)
    waiter.start()
    wait_until(lambda: budget_state(shared, lambda: None) == ([MIB], LIMIT + MIB, None), "the second share asleep")
    with shared.room:
        first.give_all()  # (under the condition, so that the waiter cannot take its room before the look)
        assert budget_state(shared, lambda: None) == ([], MIB, None)
    waiter.join(30)
    assert not waiter.is_alive() and budget_state(shared, lambda: None) == ([], 2 * MIB, None)


def test_a_thread_about_to_wait_for_memory_first_has_the_others_give_back_what_they_hold_until_wanted() -> None:
    """The threads server's settle (WaitingShare.settle_with): a share that cannot take asks every other
    connection's settler, with the budget's lock held, and takes what they gave back without waiting; a
    settler that finds its connection's lock taken gives nothing back then, and is asked again after the half
    second the waiter sleeps, so the waiter gets its room once that lock is free (never a wait for ever)."""
    shared = nbdproto_threads._budget.SharedBudget(LIMIT)
    idle, waiting = (nbdproto_threads._budget.WaitingShare(shared) for _ in range(2))
    assert idle.try_take(LIMIT)  # what an idle connection keeps until it is wanted
    connection_lock = threading.Lock()
    asked: list[bool] = []

    def settle() -> None:
        assert shared.lock._is_owned()  # type: ignore[attr-defined]  # (called holding the budget's lock)
        if not connection_lock.acquire(blocking=False):
            asked.append(False)
            return
        try:
            asked.append(True)
            idle.give(2 * MIB)
        finally:
            connection_lock.release()

    idle.settle_with(settle)
    give_up = threading.Event()  # (lets a waiter the settle failed go, so that a failure ends)
    first = threading.Thread(target=waiting.take, args=(2 * MIB, give_up), daemon=True)  # (more than guaranteed)
    first.start()
    first.join(0.4)  # less than the half second a waiter sleeps: given back at once, with no wait
    give_up.set()
    assert not first.is_alive() and asked == [True] and shared.budget.used == LIMIT
    connection_lock.acquire()  # the connection is busy with its lock: the settler must not wait for it
    waiter = threading.Thread(target=waiting.take, args=(2 * MIB, threading.Event()), daemon=True)
    waiter.start()
    wait_until(lambda: asked[1:] == [False], "the settler asked while its connection's lock is taken")
    connection_lock.release()
    waiter.join(30)
    assert not waiter.is_alive() and asked[-1] and shared.budget.used == LIMIT
    idle.settle_with(None)
    assert not shared.budget.settlers
