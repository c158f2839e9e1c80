"""What a driver does after a partial scatter-gather write of the engine's pieces, stated once."""

from __future__ import annotations

from typing import Any

__all__ = ["step_past"]


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
