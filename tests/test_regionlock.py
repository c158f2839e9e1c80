"""RegionLock alone (the mirror's range lock, nbdproto.devices._regionlock): which ranges exclude each other, the
tokens it gives, and that a waiter goes on exactly when the range it waits for is let go.

Waits are seen through the lock's observer (told just before a thread sleeps and whenever a range is let go):
a test that expects no wait fails at once if one begins, and one that expects a wait goes on once it has begun.
"""

from __future__ import annotations

import threading

import pytest

from nbdproto.devices._regionlock import RegionLock
from tests.waiting import wait_until


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


def free_lock() -> RegionLock:
    lock = RegionLock()
    lock.observer = NoWaiting()
    return lock


def test_a_token_is_the_range_an_empty_range_one_byte() -> None:
    lock = free_lock()
    assert lock.acquire(5, 3) == (5, 8)
    assert lock.acquire(100, 0) == (100, 101)  # an empty range still orders against one covering its offset


@pytest.mark.parametrize(
    ("held", "asked"),
    [((0, 10), (10, 5)), ((10, 5), (0, 10)), ((0, 10), (20, 1)), ((50, 0), (51, 4)), ((51, 4), (50, 0))],
    ids=["after", "before", "apart", "empty-then-next", "next-then-empty"],
)
def test_ranges_that_do_not_overlap_never_wait(held: tuple[int, int], asked: tuple[int, int]) -> None:
    lock = free_lock()
    lock.acquire(*held)
    lock.acquire(*asked)


@pytest.mark.parametrize(
    ("held", "asked"),
    [((0, 10), (9, 5)), ((9, 5), (0, 10)), ((0, 10), (2, 3)), ((2, 3), (0, 10)), ((4, 0), (0, 10)), ((0, 10), (4, 0))],
    ids=["tail", "head", "inside", "around", "empty-inside", "around-empty"],
)
def test_an_overlapping_range_waits_until_the_other_is_let_go(held: tuple[int, int], asked: tuple[int, int]) -> None:
    lock = RegionLock()
    watch = Watch()
    lock.observer = watch  # type: ignore[assignment]
    token = lock.acquire(*held)
    got: list[tuple[int, int]] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(*asked)), daemon=True)
    waiter.start()
    wait_until(lambda: watch.asleep.is_set() or not waiter.is_alive(), "the overlapping acquire asleep")
    assert watch.asleep.is_set() and not got, "the overlapping acquire went on without waiting"
    lock.release(token)
    waiter.join(30)
    assert not waiter.is_alive() and got == [(asked[0], asked[0] + max(asked[1], 1))]
    assert watch.releases == 1


def test_hold_holds_for_the_block_and_lets_go_after_it_even_on_error() -> None:
    lock = RegionLock()
    with lock.hold(0, 10):
        watch = Watch()
        lock.observer = watch  # type: ignore[assignment]
        done = threading.Event()

        def overlap() -> None:
            with lock.hold(5, 1):
                done.set()

        other = threading.Thread(target=overlap, daemon=True)
        other.start()
        wait_until(lambda: watch.asleep.is_set() or not other.is_alive(), "the overlapping hold asleep")
        assert watch.asleep.is_set() and not done.is_set()
    assert done.wait(30)
    with pytest.raises(ValueError, match="inside"), lock.hold(0, 10):
        raise ValueError("inside")
    lock.observer = None
    assert lock.acquire(0, 10) == (0, 10)  # let go: taken at once


def test_every_sleeper_wakes_when_its_range_is_free() -> None:
    """Two threads wait on two different held ranges; letting go of each wakes the one that waited for it."""
    lock = RegionLock()
    first, second = lock.acquire(0, 10), lock.acquire(100, 10)
    watch = Watch()
    lock.observer = watch  # type: ignore[assignment]
    finished: list[int] = []
    threads = []
    for offset in (5, 105):
        watch.asleep.clear()
        thread = threading.Thread(target=lambda o=offset: (lock.acquire(o, 1), finished.append(o)), daemon=True)
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
