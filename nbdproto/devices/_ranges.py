"""The range and permission checks every device makes, and how every device reports a hole, stated once."""

from __future__ import annotations

import errno

from nbdproto.wire import AllocationState

__all__ = ["check_range", "HOLE"]

HOLE = int(AllocationState.HOLE | AllocationState.ZERO)
"""base:allocation's flags for a hole: not allocated, and reads as zero (how every device here reports one)."""


def check_range(size: int, offset: int, length: int, *, writing: bool = False, can_write: bool = True) -> None:
    """The errors a device raises for a bad range: EINVAL for reads and ENOSPC for writes past ``size``
    (spec: "Error values"), EROFS for a write to a read-only device."""
    if offset < 0 or length < 0 or offset + length > size:
        code = errno.ENOSPC if writing else errno.EINVAL
        raise OSError(code, f"range {offset}+{length} is outside the device ({size} bytes)")
    if writing and not can_write:
        raise OSError(errno.EROFS, "the device is read-only")
