"""What a driver does after a partial scatter-gather write of the engine's pieces, and a send of them that never
waits, stated once."""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["IOV_MAX", "step_past", "send_without_waiting"]

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
"""The most buffers one ``sendmsg`` takes (Linux's UIO_MAXIOV): every driver that sends the engine's pieces
without joining them hands it at most this many at a time."""


def step_past(pieces: list[Any], start: int, sent: int) -> int:
    """After a scatter-gather write (``sendmsg``) of ``sent`` bytes from ``pieces[start:]``: the index of the first
    piece not wholly sent, that piece cut to its unsent tail (in place). Every driver that writes the pieces of
    ``data_to_send()`` without joining them uses it."""
    while sent:
        first = len(pieces[start])
        if sent < first:
            pieces[start] = memoryview(pieces[start])[sent:]
            break
        sent -= first
        start += 1
    return start


def send_without_waiting(sock: socket.socket, pieces: list[Any]) -> list[Any] | None:
    """Send as much of ``pieces`` as a plain socket takes now (MSG_DONTWAIT, whatever its blocking mode): None
    when all went, else the pieces left, the first cut to its unsent tail. For a thread that must not wait for
    the peer (an event loop, a reader serving many connections) and hands what is left to one that may."""
    start = 0
    while start < len(pieces):
        try:
            sent = sock.sendmsg(pieces[start : start + IOV_MAX], [], socket.MSG_DONTWAIT)
        except BlockingIOError:
            return pieces[start:]
        start = step_past(pieces, start, sent)
    return None
