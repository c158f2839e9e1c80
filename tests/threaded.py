"""Run a piece of work in several threads at once, for tests of what must hold under concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["run_threads"]


def run_threads(work: Callable[[int], object], count: int, timeout: float = 60.0) -> None:
    """Call ``work(0)`` ... ``work(count - 1)``, each in a thread of its own, all at once; wait for them (at most
    ``timeout`` seconds each: a thread still running then is a failure, not a hang) and raise the first
    exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    stuck = sum(thread.is_alive() for thread in threads)
    assert not stuck, f"{stuck} of {count} threads still running after {timeout} s"
    if errors:
        raise errors[0]
