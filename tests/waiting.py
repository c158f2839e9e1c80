"""Waiting in tests for a state that can be observed, never for a length of time: ``wait_until``.

Where something gives an event (a socket that becomes readable, a thread that ends, a line a process prints),
tests wait on that. Some states give none: another process listening on a socket (/proc/net/tcp), a server
thread waiting on a lock (its stack), a file appearing. Those are polled here, and only here: the wait ends
when the state is seen, and a state never seen is a failure after the bound, named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(observe: Callable[[], T], what: str, timeout: float = 30.0, every: float = 0.01) -> T:
    """``observe()``'s value as soon as it is true; AssertionError naming ``what`` if it is not within
    ``timeout`` seconds. ``every``: seconds between looks (a look that costs much, such as a walk of the
    garbage collector's objects, asks for fewer)."""
    deadline = time.monotonic() + timeout
    while True:
        value = observe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s (last seen: {value!r})")
        time.sleep(every)  # the pace of looking; the wait ends on the state itself (or fails at the deadline)
