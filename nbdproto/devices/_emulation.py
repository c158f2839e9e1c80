"""What a device does for a request its capabilities say it cannot do itself, stated once for every device that
passes requests on to another (the mirror's sides, a remote export), as nbdkit's server does for its plugins.

- FUA on a device without it: the request without FUA, then a flush (where the device can flush at all).
- Zeroing on a device that cannot zero: writes of zeroes, none larger than the device accepts.
- Trimming on a device that cannot trim: nothing (a trim is advisory: the device keeps the data).
"""

from __future__ import annotations

from collections.abc import Callable

from nbdproto.serving import Buffer, DeviceCapabilities

__all__ = ["ZEROES", "native_fua", "flush_for_fua", "zero_by_writing"]

ZEROES = memoryview(bytes(1 << 20))
"""Zero bytes to write from, for every device that zeroes by writing (read only)."""


def native_fua(capabilities: DeviceCapabilities, fua: bool) -> bool:
    """Whether to ask the device itself for FUA (when asked for it and the device has it)."""
    return fua and capabilities.can_fua


def flush_for_fua(capabilities: DeviceCapabilities, fua: bool, flush: Callable[[], None]) -> None:
    """After a request asked for FUA: the flush that stands in for it on a device without FUA."""
    if fua and not capabilities.can_fua and capabilities.can_flush:
        flush()


def zero_by_writing(write: Callable[[Buffer, int], None], offset: int, length: int, maximum_payload: int) -> None:
    """Make [offset, offset + length) read as zero with ``write(data, offset)`` calls of at most
    ``maximum_payload`` bytes each: WRITE_ZEROES for a device that cannot zero."""
    step = min(len(ZEROES), maximum_payload)
    for at in range(offset, offset + length, step):
        write(ZEROES[: min(step, offset + length - at)], at)
