"""RegionLocks alone (the one range lock of the devices: the mirror's copy and writes, the filters'
read-modify-writes): which ranges exclude each other, shared and exclusive, the tokens it gives, and that a
waiter goes on exactly when the range it waits for is let go.

Waits are seen through the lock's observer (told just before a thread sleeps and whenever a range is let go):
a test that expects no wait fails at once if one begins, and one that expects a wait goes on once it has begun.
"""

from __future__ import annotations

import threading

import pytest

from nbdproto.devices import RegionLocks
from tests.waiting import running, wait_until


class NoWaiting:
    """An observer that fails the acquire that would sleep: the range it asks for must be free."""

    def waiting(self) -> None:
        raise AssertionError("the acquire waits, though no held range overlaps it")

    def released(self) -> None:
        pass


class Watch:
    """An observer that tells when a thread is about to sleep on the lock, and counts the ranges let go."""

    def __init__(self) -> None:
        self.asleep = threading.Event()
        self.releases = 0

    def waiting(self) -> None:
        self.asleep.set()

    def released(self) -> None:
        self.releases += 1


def free_lock() -> RegionLocks:
    lock = RegionLocks()
    lock.observer = NoWaiting()
    return lock


def test_a_token_is_the_range_and_its_kind_an_empty_range_one_byte() -> None:
    lock = free_lock()
    assert lock.acquire(5, 8) == (5, 8, True)
    assert lock.acquire(100, 100) == (100, 101, True)  # an empty range still orders against one covering its offset
    assert lock.acquire(200, 210, exclusive=False) == (200, 210, False)


@pytest.mark.parametrize(
    ("held", "asked"),
    [((0, 10), (10, 15)), ((10, 15), (0, 10)), ((0, 10), (20, 21)), ((50, 50), (51, 55)), ((51, 55), (50, 50))],
    ids=["after", "before", "apart", "empty-then-next", "next-then-empty"],
)
def test_ranges_that_do_not_overlap_never_wait(held: tuple[int, int], asked: tuple[int, int]) -> None:
    lock = free_lock()
    lock.acquire(*held)
    lock.acquire(*asked)


@pytest.mark.parametrize(
    ("held", "asked"),
    [
        ((0, 10), (9, 14)),
        ((9, 14), (0, 10)),
        ((0, 10), (2, 5)),
        ((2, 5), (0, 10)),
        ((4, 4), (0, 10)),
        ((0, 10), (4, 4)),
    ],
    ids=["tail", "head", "inside", "around", "empty-inside", "around-empty"],
)
def test_an_overlapping_range_waits_until_the_other_is_let_go(held: tuple[int, int], asked: tuple[int, int]) -> None:
    lock = RegionLocks()
    watch = Watch()
    lock.observer = watch  # type: ignore[assignment]
    token = lock.acquire(*held)
    got: list[tuple[int, int, bool]] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(*asked)), daemon=True)
    waiter.start()
    wait_until(lambda: watch.asleep.is_set() or not waiter.is_alive(), "the overlapping acquire asleep")
    assert watch.asleep.is_set() and not got, "the overlapping acquire went on without waiting"
    lock.release(token)
    waiter.join(30)
    assert not waiter.is_alive() and got == [(asked[0], max(asked[1], asked[0] + 1), True)]
    assert watch.releases == 1


def test_exclusive_holds_for_the_block_and_lets_go_after_it_even_on_error() -> None:
    lock = RegionLocks()
    with lock.exclusive(0, 10):
        watch = Watch()
        lock.observer = watch  # type: ignore[assignment]
        done = threading.Event()

        def overlap() -> None:
            with lock.exclusive(5, 6):
                done.set()

        other = threading.Thread(target=overlap, daemon=True)
        other.start()
        wait_until(lambda: watch.asleep.is_set() or not other.is_alive(), "the overlapping hold asleep")
        assert watch.asleep.is_set() and not done.is_set()
    assert done.wait(30)
    with pytest.raises(ValueError, match="inside"), lock.exclusive(0, 10):
        raise ValueError("inside")
    lock.observer = None
    assert lock.acquire(0, 10) == (0, 10, True)  # let go: taken at once


def test_every_sleeper_wakes_when_its_range_is_free() -> None:
    """Two threads wait on two different held ranges; letting go of each wakes the one that waited for it."""
    lock = RegionLocks()
    first, second = lock.acquire(0, 10), lock.acquire(100, 110)
    watch = Watch()
    lock.observer = watch  # type: ignore[assignment]
    finished: list[int] = []
    threads = []
    for offset in (5, 105):
        watch.asleep.clear()
        thread = threading.Thread(target=lambda o=offset: (lock.acquire(o, o + 1), finished.append(o)), daemon=True)
        thread.start()
        wait_until(lambda t=thread: watch.asleep.is_set() or not t.is_alive(), "the acquire asleep")
        assert watch.asleep.is_set() and not finished
        threads.append(thread)
    lock.release(second)
    threads[1].join(30)
    assert finished == [105]
    lock.release(first)
    threads[0].join(30)
    assert finished == [105, 5]


def test_shared_holders_overlap_each_other_but_not_an_exclusive_one() -> None:
    """Plain writers hold their ranges shared and never wait for each other; a read-modify-write (exclusive)
    waits for every shared holder that overlaps it, and shared holders wait for an exclusive one."""
    lock = free_lock()
    first = lock.acquire(0, 10, exclusive=False)
    second = lock.acquire(5, 15, exclusive=False)  # overlapping shared holders: no wait
    lock.observer = watch = Watch()  # type: ignore[assignment]
    got: list[str] = []
    rmw = threading.Thread(target=lambda: (lock.acquire(8, 9), got.append("exclusive")), daemon=True)
    rmw.start()
    wait_until(lambda: watch.asleep.is_set() or not rmw.is_alive(), "the exclusive acquire asleep")
    assert watch.asleep.is_set() and not got, "an exclusive range went on over shared holders"
    lock.release(first)
    assert not got  # the second shared holder still overlaps
    lock.release(second)
    rmw.join(30)
    assert got == ["exclusive"]
    watch.asleep.clear()
    writer = threading.Thread(target=lambda: (lock.acquire(0, 9, exclusive=False), got.append("shared")), daemon=True)
    writer.start()
    wait_until(lambda: watch.asleep.is_set() or not writer.is_alive(), "the shared acquire asleep")
    assert watch.asleep.is_set() and got == ["exclusive"], "a shared range went on over an exclusive holder"
    lock.release((8, 9, True))
    writer.join(30)
    assert got == ["exclusive", "shared"]


def test_the_shared_context_holds_its_range_shared() -> None:
    """``shared()`` (what plain writers use) holds shared: overlapping shared holds go on at once, an exclusive one
    over them would wait (NoWaiting fails it), and each is let go after its block."""
    lock = free_lock()
    with lock.shared(0, 10), lock.shared(5, 15), lock.shared(9, 10), pytest.raises(AssertionError, match="waits"):
        lock.acquire(8, 9)
    assert lock.acquire(0, 15) == (0, 15, True)  # all let go: taken at once


def test_a_lock_without_an_observer_waits_and_wakes_alike() -> None:
    """The devices' locks have no observer (only tests set one): a thread still sleeps on a held range, seen on
    its stack, and goes on when it is let go."""
    lock = RegionLocks()
    held = lock.acquire(0, 10)
    got: list[tuple[int, int, bool]] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(5, 6)), daemon=True)
    waiter.start()
    wait_until(lambda: running(waiter, threading.Condition.wait) or not waiter.is_alive(), "the acquire asleep")
    assert waiter.is_alive() and not got
    lock.release(held)
    waiter.join(30)
    assert got == [(5, 6, True)]
