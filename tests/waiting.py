"""Waiting in tests for a state that can be observed, never for a length of time: ``wait_until``.

Where something gives an event (a socket that becomes readable, a thread that ends, a line a process prints),
tests wait on that. Some states give none: another process listening on a socket (/proc/net/tcp), a server
thread waiting on a lock (its stack), a file appearing. Those are polled here, and only here: the wait ends
when the state is seen, and a state never seen is a failure after the bound, named.
"""

from __future__ import annotations

import inspect
import sys
import threading
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


def running(thread: threading.Thread, *functions: Callable[..., object]) -> bool:
    """Whether ``thread`` is, right now, inside each of ``functions`` (its stack holds a frame of each): the
    state "the other thread is waiting in X" that a test would otherwise sleep for."""
    frame = sys._current_frames().get(thread.ident or -1)
    codes = set()
    while frame is not None:
        codes.add(frame.f_code)
        frame = frame.f_back
    return all(inspect.unwrap(function).__code__ in codes for function in functions)  # type: ignore[attr-defined]


def tcp_listening(port: int) -> bool:
    """Whether a socket listens on loopback port ``port`` (on 127.0.0.1, or on any address: 0.0.0.0, or :: which
    takes IPv4 too), seen in /proc/net/tcp and tcp6 without connecting: a probe connection would be a client
    to the server (one a oneshot server serves, and then exits)."""
    addresses = {
        "/proc/net/tcp": {"0100007F", "00000000"},
        "/proc/net/tcp6": {"0" * 32, "0000000000000000FFFF00000100007F"},
    }
    for path, wanted in addresses.items():
        try:
            with open(path) as table:
                rows = [line.split() for line in list(table)[1:]]
        except FileNotFoundError:  # no IPv6 here
            continue
        for fields in rows:
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port and address in wanted:  # 0A: LISTEN
                return True
    return False


def unix_listening(path: str) -> bool:
    """Whether a socket listens on the unix socket ``path`` (/proc/net/unix: the file appears at bind, a moment
    before the listen)."""
    with open("/proc/net/unix") as table:
        return any(
            len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
            for fields in (line.split() for line in list(table)[1:])
        )
