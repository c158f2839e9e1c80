"""How a mirror reports where it stands: ``MirrorState`` and ``MirrorStatus`` (``MirrorDevice.status()``), and the
progress callback's values."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MirrorState", "MirrorStatus", "Progress"]

Progress = Callable[[int | str], None]
"""The progress callback: the percentage copied (an int, 0 to 100) whenever it changes, then the string
"complete" once the secondary is a durable copy; or "failed: reason" if the copy stopped. Called from the
copy's threads (or a client's, for a failure its write found): it should return quickly."""


class MirrorState(enum.Enum):
    """Where a mirror stands."""

    COPYING = "copying"
    """The background copy runs: the secondary is not a copy yet (writes reach both sides already)."""
    SYNCHRONISED = "synchronised"
    """The secondary is a durable copy, and every write reaches both sides."""
    FAILED = "failed"
    """The secondary (or reading the primary) failed: writes are refused so that the two cannot diverge."""


@dataclass(frozen=True)
class MirrorStatus:
    """How the mirror stands: its ``state``, and ``reason`` when it failed; ``copied`` of ``total`` bytes have
    reached the secondary (``data`` of them as data, the rest as zeroes); ``rate`` is bytes copied per second
    since the copy began (until it ended)."""

    state: MirrorState
    copied: int
    data: int
    total: int
    elapsed: float
    rate: float
    reason: str | None = None

    @property
    def percent(self) -> int:
        return self.copied * 100 // self.total if self.total else 100
